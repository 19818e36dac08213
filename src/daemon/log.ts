/** Structured logs: one JSON object per line in STATE_DIR/ferryd.log. */
import fs from 'node:fs';

export type Level = 'debug' | 'info' | 'warn' | 'error';

export class Logger {
  private fd: number | undefined;
  /** Lines a full disk refused; logging must never be the thing that fails an action. */
  private dropped = { n: 0 };
  constructor(readonly file: string | undefined, private readonly base: Record<string, unknown> = {}, private readonly echo = false) {
    if (file) this.fd = fs.openSync(file, 'a', 0o600);
  }
  child(fields: Record<string, unknown>): Logger {
    const l = Object.create(this) as Logger;
    (l as unknown as { base: Record<string, unknown> }).base = { ...this.base, ...fields };
    return l;
  }
  log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
    const line = JSON.stringify({ ts: new Date().toISOString(), level, msg, ...this.base, ...fields }) + '\n';
    if (this.fd !== undefined) {
      try {
        if (this.dropped.n) {
          fs.writeSync(this.fd, JSON.stringify({ ts: new Date().toISOString(), level: 'warn', msg: 'log lines dropped: the disk was full', count: this.dropped.n, ...this.base }) + '\n');
          this.dropped.n = 0;
        }
        fs.writeSync(this.fd, line);
      } catch {
        this.dropped.n++;
      }
    }
    if (this.echo || (level === 'error' && this.fd === undefined)) process.stderr.write(line);
  }
  debug(msg: string, f?: Record<string, unknown>): void { this.log('debug', msg, f); }
  info(msg: string, f?: Record<string, unknown>): void { this.log('info', msg, f); }
  warn(msg: string, f?: Record<string, unknown>): void { this.log('warn', msg, f); }
  error(msg: string, f?: Record<string, unknown>): void { this.log('error', msg, f); }
}
