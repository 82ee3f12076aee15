#!/usr/bin/env node
// The `weft` command. weft runs its TypeScript sources through tsx (a runtime dependency), so the CLI, the
// workers it spawns and the GPU bundle all run the same files with no separate build step.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../coordinator/cli.ts');
process.exitCode = await main(process.argv);
