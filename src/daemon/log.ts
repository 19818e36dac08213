/**
 * Structured logs: one JSON object per line in STATE_DIR/ferryd.log, rotated by size
 * (ferryd.log.1 … .KEEP), so that a chatty guest or a refusal flood cannot fill the
 * disk that also holds domain and job state.
 */
import fs from 'node:fs';

export type Level = 'debug' | 'info' | 'warn' | 'error';
export const LEVELS: readonly Level[] = ['debug', 'info', 'warn', 'error'];

export class Logger {
  /** Lines a full disk refused; logging must never be the thing that fails an action. */
  private dropped = { n: 0 };
  /** Shared with child loggers (they are prototypes of this one). */
  private out = { fd: undefined as number | undefined, size: 0 };
  /**
   * `level`: the lowest level written. Debug lines (every QMP event, for one) stay out
   * unless ferryd.json says "logLevel": "debug".
   */
  constructor(readonly file: string | undefined, private readonly base: Record<string, unknown> = {}, private readonly echo = false, private readonly rotate = { maxBytes: 16 * 1048576, keep: 3 }, private readonly level: Level = 'info') {
    if (file) this.open();
  }
  private open(): void {
    this.out.fd = fs.openSync(this.file!, 'a', 0o600);
    this.out.size = fs.fstatSync(this.out.fd).size;
  }
  private rotateNow(): void {
    const f = this.file!;
    try { fs.closeSync(this.out.fd!); } catch { /* closed */ }
    for (let i = this.rotate.keep; i >= 1; i--) {
      try { if (i === this.rotate.keep) fs.rmSync(`${f}.${i}`, { force: true }); else fs.renameSync(`${f}.${i}`, `${f}.${i + 1}`); } catch { /* absent */ }
    }
    try { fs.renameSync(f, `${f}.1`); } catch { /* absent */ }
    this.open();
  }
  child(fields: Record<string, unknown>): Logger {
    const l = Object.create(this) as Logger;
    (l as unknown as { base: Record<string, unknown> }).base = { ...this.base, ...fields };
    return l;
  }
  log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
    if (LEVELS.indexOf(level) < LEVELS.indexOf(this.level)) return;
    const line = JSON.stringify({ ts: new Date().toISOString(), level, msg, ...this.base, ...fields }) + '\n';
    if (this.out.fd !== undefined) {
      try {
        if (this.out.size + line.length > this.rotate.maxBytes) this.rotateNow();
        if (this.dropped.n) {
          const l = JSON.stringify({ ts: new Date().toISOString(), level: 'warn', msg: 'log lines dropped: the disk was full', count: this.dropped.n, ...this.base }) + '\n';
          this.out.size += fs.writeSync(this.out.fd, l);
          this.dropped.n = 0;
        }
        this.out.size += fs.writeSync(this.out.fd, line);
      } catch {
        this.dropped.n++;
      }
    }
    if (this.echo || (level === 'error' && this.out.fd === undefined)) process.stderr.write(line);
  }
  debug(msg: string, f?: Record<string, unknown>): void { this.log('debug', msg, f); }
  info(msg: string, f?: Record<string, unknown>): void { this.log('info', msg, f); }
  warn(msg: string, f?: Record<string, unknown>): void { this.log('warn', msg, f); }
  error(msg: string, f?: Record<string, unknown>): void { this.log('error', msg, f); }
}
