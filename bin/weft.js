#!/usr/bin/env node
// The `weft` command. In the repository it runs the TypeScript sources through tsx, so the CLI, the workers it
// spawns and the GPU bundle run the same files with no build step. The installed package ships no sources:
// there it runs the JavaScript that `npm run build` compiled into dist/, without tsx.
import { existsSync } from 'node:fs';

const source = new URL('../coordinator/cli.ts', import.meta.url);
const runsSources = existsSync(source);
if (runsSources) (await import('tsx/esm/api')).register();
const { main } = await import((runsSources ? source : new URL('../dist/coordinator/cli.js', import.meta.url)).href);
process.exitCode = await main(process.argv);
