/**
 * The page compressions a move may name, without zod: the CLI checks --compress with
 * these, and importing shapes.ts (zod) would add about 0.1 s to every command's start.
 */

/** The page compressions a move may ask for (QEMU's multifd compression; zstd is built into Debian's QEMU). */
export const COMPRESSIONS = ['none', 'zstd'] as const;
export type Compression = (typeof COMPRESSIONS)[number];
/** What an operator may ask for: a method, or auto (the source samples the guest's pages and decides, migration/plan.ts chooseCompression). */
export const COMPRESS_CHOICES = [...COMPRESSIONS, 'auto'] as const;
export type CompressChoice = (typeof COMPRESS_CHOICES)[number];
