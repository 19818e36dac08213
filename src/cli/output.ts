/** How the CLI speaks: tables for people, JSON for programs, coded errors for both. */
import type { Command } from 'commander';
import { FerryError, asFerryError } from '../errors.ts';

export function printJson(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + '\n');
}

export function table(rows: (string | number)[][], align: ('l' | 'r')[]): string {
  const w = align.map((_, i) => Math.max(...rows.map((r) => String(r[i] ?? '').length)));
  return (
    rows
      .map((r) =>
        r
          .map((c, i) => (align[i] === 'r' ? String(c).padStart(w[i]) : String(c).padEnd(w[i])))
          .join('  ')
          .trimEnd(),
      )
      .join('\n') + '\n'
  );
}

/** Prints an error the way the caller asked, and returns the documented exit code. */
export function reportError(e: unknown, json: boolean): number {
  const fe: FerryError = asFerryError(e);
  if (json) printJson({ error: fe.toJSON() });
  else process.stderr.write(`ferry: ${fe.code}: ${fe.message}\n`);
  return fe.exitCode;
}

export function isTty(): boolean {
  return !!process.stdout.isTTY;
}

export function humanState(s: string): string {
  return s === 'shutoff' ? 'shut off' : s;
}

export function fmtBytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / 1024).toFixed(0)} KiB`;
  return `${n} B`;
}

let jsonMode = false;
/** Whether the last command run through `act` asked for --json (for errors commander raises afterwards). */
export function lastJsonMode(): boolean {
  return jsonMode;
}

/** Wraps a command's action: prints its result (JSON with --json) or its error, and sets the exit code. */
export function act<A extends unknown[], R>(fn: (...a: A) => Promise<R>, human?: (r: R) => void): (...a: A) => Promise<void> {
  return async (...a: A) => {
    const cmd = a[a.length - 1] as Command;
    const opts = (cmd.opts?.() ?? {}) as { json?: boolean };
    jsonMode = !!opts.json;
    try {
      const r = await fn(...a);
      if (r === undefined) return;
      if (opts.json) printJson(r);
      else if (human) human(r);
      else if (typeof r === 'string') process.stdout.write(r);
      else printJson(r);
    } catch (e) {
      process.exitCode = reportError(e, !!opts.json);
    }
  };
}

export function hostOpt(cmd: Command): string | undefined {
  let c: Command | null = cmd;
  while (c) {
    const h = (c.opts() as { host?: string }).host;
    if (h) return h;
    c = c.parent;
  }
  return undefined;
}
