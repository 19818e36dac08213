/** Small filesystem helpers: atomic JSON persistence and line-oriented reading. */
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../errors.ts';

/**
 * Writes a file so that a crash leaves either the old or the new content, never a
 * torn one: write a temp file beside it, fsync it, rename over, fsync the directory.
 */
export function writeFileAtomic(file: string, data: string | Buffer, mode = 0o600): void {
  const dir = path.dirname(file);
  fs.mkdirSync(dir, { recursive: true });
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.${Date.now()}.tmp`);
  try {
    const fd = fs.openSync(tmp, 'w', mode);
    try {
      fs.writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (e) {
    // A full disk must not also keep the half-written temp file.
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  try {
    const dfd = fs.openSync(dir, 'r');
    fs.fsyncSync(dfd);
    fs.closeSync(dfd);
  } catch {
    /* some filesystems refuse fsync on directories */
  }
}

export function writeJsonAtomic(file: string, value: unknown): void {
  writeFileAtomic(file, JSON.stringify(value, null, 2) + '\n');
}

/**
 * ferryd's state writes. `write` persists before the caller goes on and throws
 * STATE_WRITE_FAILED if it cannot (disk full, read-only): use it before an irreversible
 * step. Either way a failed write is retried in the background with the latest value
 * until it lands, so a record of something that already happened (`writeLater`) is not
 * lost when the disk has room again. `drop` forgets a pending write of a file that is
 * being deleted.
 */
export class StateWriter {
  private pending = new Map<string, () => unknown>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly onRetryFailed: (file: string, error: string) => void = () => undefined,
    private readonly retryMs = 2000,
  ) {}

  write(file: string, value: () => unknown): void {
    try {
      writeJsonAtomic(file, value());
      this.pending.delete(file);
    } catch (e) {
      this.pending.set(file, value);
      this.arm();
      const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
      throw new FerryError('STATE_WRITE_FAILED', `Cannot write ${file}: ${code}${code === 'ENOSPC' ? ' (the disk is full)' : ''}`, {
        file,
        errno: code,
      });
    }
  }

  /** True if it was written now; false if it will be retried. Never throws. */
  writeLater(file: string, value: () => unknown): boolean {
    try {
      this.write(file, value);
      return true;
    } catch {
      return false;
    }
  }

  drop(file: string): void {
    this.pending.delete(file);
  }

  get pendingFiles(): string[] {
    return [...this.pending.keys()];
  }

  private arm(): void {
    if (this.timer) return;
    this.timer = setInterval(() => {
      for (const [file, value] of [...this.pending]) {
        try {
          writeJsonAtomic(file, value());
          this.pending.delete(file);
        } catch (e) {
          this.onRetryFailed(file, (e as NodeJS.ErrnoException).code ?? String(e));
        }
      }
      if (this.pending.size === 0) {
        clearInterval(this.timer);
        this.timer = undefined;
      }
    }, this.retryMs);
    this.timer.unref();
  }
}

export function readJson<T = unknown>(file: string): T {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
}

/**
 * The API's reader (server and client): JSON lines, where a line may announce raw bytes
 * that follow it (a RAM repair's page data, sent as is instead of as base64). Works on
 * bytes and decodes each whole line as UTF-8, so a character split between two reads is
 * not corrupted. `onLine` returns how many raw bytes follow the line (0: none); they
 * reach `onBinary` in one piece. It may instead return FrameSplitter.REST: the stream
 * stops being lines (console.attach), and every later byte goes to `onRest`. A line
 * longer than maxLine calls onOverflow.
 */
export class FrameSplitter {
  static readonly REST = -1;
  private parts: Buffer[] = [];
  private size = 0;
  private want = 0;
  private rest = false;
  constructor(
    private readonly onLine: (line: string) => number,
    private readonly onBinary: (data: Buffer) => void,
    opts: { maxLine?: number; onOverflow?: () => void; onRest?: (data: Buffer) => void } = {},
  ) {
    this.maxLine = opts.maxLine ?? 1024 * 1024;
    this.onOverflow = opts.onOverflow;
    this.onRest = opts.onRest;
  }

  private readonly maxLine: number;
  private readonly onOverflow?: () => void;
  private readonly onRest?: (data: Buffer) => void;

  push(chunk: Buffer): void {
    while (chunk.length > 0) {
      if (this.rest) {
        this.onRest?.(chunk);
        return;
      }
      if (this.want > 0) {
        const take = Math.min(this.want, chunk.length);
        this.parts.push(chunk.subarray(0, take));
        this.size += take;
        this.want -= take;
        chunk = chunk.subarray(take);
        if (this.want === 0) this.onBinary(this.take());
        continue;
      }
      const i = chunk.indexOf(0x0a);
      if (i < 0) {
        this.parts.push(chunk);
        this.size += chunk.length;
        if (this.size > this.maxLine) {
          this.take();
          this.onOverflow?.();
        }
        return;
      }
      this.parts.push(chunk.subarray(0, i));
      chunk = chunk.subarray(i + 1);
      const n = this.onLine(this.take().toString('utf8'));
      if (n === FrameSplitter.REST) this.rest = true;
      else if (n > 0) this.want = n;
    }
  }

  private take(): Buffer {
    const b = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts);
    this.parts = [];
    this.size = 0;
    return b;
  }
}
