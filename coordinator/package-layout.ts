import { readFileSync } from 'node:fs';

/**
 * Where weft's own files are. weft runs from two trees of one layout: its TypeScript sources (the repository,
 * through tsx) and the compiled JavaScript of the installed package (`dist/`, made by `npm run build`, one level
 * below the package root). Modules that start a process or a thread, or read package.json, name their target
 * through here, so the same code finds it in both.
 */

/** '.ts' when this module runs from the sources, '.js' when it runs from dist/. */
const MODULE_EXTENSION = import.meta.url.endsWith('.ts') ? '.ts' : '.js';

/** true when weft runs its TypeScript sources (tsx is registered), false in the compiled package. */
export const RUNS_SOURCES = MODULE_EXTENSION === '.ts';

/** The file URL of a weft module, named relative to coordinator/ and without extension ('../worker/main'). */
export function moduleUrl(relativeToCoordinator: string): string {
  return new URL(relativeToCoordinator + MODULE_EXTENSION, import.meta.url).href;
}

/** The package root (package.json, native/): the repository, or the folder that holds dist/. */
export const PACKAGE_ROOT = new URL(RUNS_SOURCES ? '../' : '../../', import.meta.url);

/** What weft reads of its package.json: the version (`weft --version`) and the Node.js it needs (`weft doctor`). */
export const PACKAGE_JSON = JSON.parse(readFileSync(new URL('package.json', PACKAGE_ROOT), 'utf8')) as { readonly version: string; readonly engines: { readonly node: string } };
