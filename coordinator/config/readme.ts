/**
 * The README's option table, made from the declarations. test/unit/config.test.ts fails when README.md's table
 * differs; `node --import tsx coordinator/config/readme.ts` rewrites it.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describeDefault, OPTIONS } from '../config.ts';
import type { Context, OptionDeclaration } from './options.ts';

export const README = fileURLToPath(new URL('../../README.md', import.meta.url));
export const TABLE_BEGIN = '<!-- options: generated from coordinator/config/options.ts by coordinator/config/readme.ts -->';
export const TABLE_END = '<!-- options: end -->';

const API: Partial<Record<Context, string>> = { cluster: 'startCluster', server: 'serve()' };

function row(key: string, decl: OptionDeclaration<unknown>): string {
  const code = (text: string | undefined): string => (text === undefined ? '' : `\`${text}\``);
  const spelling = (flag: string): string => code(decl.arg ? `${flag} ${decl.arg}` : flag);
  const flag = decl.flag === undefined ? '' : [spelling(decl.flag), ...(decl.aliases ?? []).map((alias) => `(also ${spelling(alias)})`)].join(' ');
  const inCode = decl.uses.some((use) => use in API) ? code(decl.field ?? key) : '';
  const uses = decl.uses.map((use) => API[use] ?? use).join(', ');
  const cells = [flag, code(decl.env), inCode, describeDefault(decl) ?? (decl.required ? 'required' : ''), uses, decl.help];
  return `| ${cells.map((cell) => cell.replaceAll('|', '\\|')).join(' | ')} |`;
}

export function optionsTable(): string {
  const rows = Object.entries(OPTIONS).map(([key, decl]) => row(key, decl as OptionDeclaration<unknown>));
  return [TABLE_BEGIN, '| flag | environment | in code | default | used by | what |', '| --- | --- | --- | --- | --- | --- |', ...rows, TABLE_END].join('\n');
}

/** README.md's table as it stands (begin to end marker), or null when the markers are missing. */
export function readmeTable(readme: string): string | null {
  const begin = readme.indexOf(TABLE_BEGIN);
  const end = readme.indexOf(TABLE_END);
  return begin < 0 || end < begin ? null : readme.slice(begin, end + TABLE_END.length);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const readme = readFileSync(README, 'utf8');
  const table = readmeTable(readme);
  if (table === null) throw new Error(`${README} has no ${TABLE_BEGIN} ... ${TABLE_END} block`);
  writeFileSync(README, readme.replace(table, optionsTable()));
}
