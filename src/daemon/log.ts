/**
 * Structured logs through pino: one JSON object per line in STATE_DIR/ferryd.log
 * ({ts, level, msg, …fields}), with levels (debug lines, such as every QMP event, stay
 * off unless ferryd.json says "logLevel": "debug").
 *
 * pino formats; the sink below is ferry's own, because ferryd.log must rotate by size
 * (ferryd.log.1 … .KEEP), so that a chatty guest or a refusal flood cannot fill the disk
 * that also holds domain and job state, and a full disk must drop lines (counted, and
 * said once there is room) rather than fail the action that logged. pino writes to it
 * synchronously, line by line.
 */
import fs from 'node:fs';
import pino from 'pino';
import type { Level } from './levels.ts';

/** A size-rotated append-only file that never throws. */
class RotatingSink {
  private fd: number | undefined;
  private size = 0;
  /** Lines a full disk refused; logging must never be the thing that fails an action. */
  private dropped = 0;

  constructor(
    private readonly file: string | undefined,
    private readonly rotate: { maxBytes: number; keep: number },
    private readonly echo: boolean,
  ) {
    if (file) this.open();
  }

  private open(): void {
    this.fd = fs.openSync(this.file!, 'a', 0o600);
    this.size = fs.fstatSync(this.fd).size;
  }

  private rotateNow(): void {
    const f = this.file!;
    try {
      fs.closeSync(this.fd!);
    } catch {
      /* closed */
    }
    for (let i = this.rotate.keep; i >= 1; i--) {
      try {
        if (i === this.rotate.keep) fs.rmSync(`${f}.${i}`, { force: true });
        else fs.renameSync(`${f}.${i}`, `${f}.${i + 1}`);
      } catch {
        /* absent */
      }
    }
    try {
      fs.renameSync(f, `${f}.1`);
    } catch {
      /* absent */
    }
    this.open();
  }

  write(line: string): void {
    if (this.fd !== undefined) {
      try {
        if (this.size + Buffer.byteLength(line) > this.rotate.maxBytes) this.rotateNow();
        if (this.dropped) {
          const l =
            JSON.stringify({
              ts: new Date().toISOString(),
              level: 'warn',
              msg: 'log lines dropped: the disk was full',
              count: this.dropped,
            }) + '\n';
          this.size += fs.writeSync(this.fd, l);
          this.dropped = 0;
        }
        this.size += fs.writeSync(this.fd, line);
      } catch {
        this.dropped++;
      }
    }
    // Without a file, errors still reach someone.
    if (this.echo || (this.fd === undefined && line.includes('"level":"error"'))) process.stderr.write(line);
  }
}

/** base: fields on every line; echo: to stderr as well; rotate: size and files kept; level: the lowest written; from: a parent's pino (child). */
export interface LoggerOptions {
  base?: Record<string, unknown>;
  echo?: boolean;
  rotate?: { maxBytes: number; keep: number };
  level?: Level;
  from?: pino.Logger;
}

export class Logger {
  private readonly p: pino.Logger;

  /** `level`: the lowest level written. */
  constructor(
    readonly file: string | undefined,
    opts: LoggerOptions = {},
  ) {
    const { base = {}, echo = false, rotate = { maxBytes: 16 * 1048576, keep: 3 }, level = 'info', from } = opts;
    this.p =
      from ??
      pino(
        {
          level,
          base: Object.keys(base).length ? base : undefined,
          messageKey: 'msg',
          timestamp: () => `,"ts":"${new Date().toISOString()}"`,
          formatters: { level: (label) => ({ level: label }) },
        },
        new RotatingSink(file, rotate, echo),
      );
  }

  /** A logger that adds `fields` to every line; it shares the file and its rotation. */
  child(fields: Record<string, unknown>): Logger {
    return new Logger(this.file, { from: this.p.child(fields) });
  }

  // The message goes in first, so that a line reads {level, ts, …base, msg, …fields}
  // (pino would append it after the fields).
  log(level: Level, msg: string, fields: Record<string, unknown> = {}): void {
    this.p[level]({ msg, ...fields });
  }
  debug(msg: string, f?: Record<string, unknown>): void {
    this.log('debug', msg, f);
  }
  info(msg: string, f?: Record<string, unknown>): void {
    this.log('info', msg, f);
  }
  warn(msg: string, f?: Record<string, unknown>): void {
    this.log('warn', msg, f);
  }
  error(msg: string, f?: Record<string, unknown>): void {
    this.log('error', msg, f);
  }
}
