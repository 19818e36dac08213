/** Structured logs: one JSON object per line in STATE_DIR/ferryd.log. */
import fs from 'node:fs';

export type Level = 'debug' | 'info' | 'warn' | 'error';

export class Logger {
  private fd: number | undefined;
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
    if (this.fd !== undefined) fs.writeSync(this.fd, line);
    if (this.echo || (level === 'error' && this.fd === undefined)) process.stderr.write(line);
  }
  debug(msg: string, f?: Record<string, unknown>): void { this.log('debug', msg, f); }
  info(msg: string, f?: Record<string, unknown>): void { this.log('info', msg, f); }
  warn(msg: string, f?: Record<string, unknown>): void { this.log('warn', msg, f); }
  error(msg: string, f?: Record<string, unknown>): void { this.log('error', msg, f); }
}
