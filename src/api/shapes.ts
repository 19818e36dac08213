/**
 * The zod shapes of API parameters, each with the words a refusal uses: shared by the
 * actions' registry (schema.ts) and the relocation protocol's messages (relocation.ts).
 */
import { z } from 'zod';
import { COMPRESSIONS, COMPRESS_CHOICES } from './compression.ts';

export type { Compression, CompressChoice } from './compression.ts';

export const str = z
  .string({ error: 'must be a non-empty string' })
  .min(1, { error: 'must be a non-empty string' })
  .max(4096, { error: 'must be a non-empty string' });
export const optStr = str.optional();
export const optBool = z.boolean({ error: 'must be true or false' }).optional();
export const int = (min: number, max: number) =>
  z
    .number({ error: `must be an integer from ${min} to ${max}` })
    .int({ error: `must be an integer from ${min} to ${max}` })
    .min(min, { error: `must be an integer from ${min} to ${max}` })
    .max(max, { error: `must be an integer from ${min} to ${max}` });
export const optNum = (min: number, max: number) =>
  z
    .number({ error: `must be a number from ${min} to ${max}` })
    .finite({ error: `must be a number from ${min} to ${max}` })
    .min(min, { error: `must be a number from ${min} to ${max}` })
    .max(max, { error: `must be a number from ${min} to ${max}` })
    .optional();
/** A move's page compression (--compress). */
export const optCompress = z.enum(COMPRESSIONS, { error: `must be one of ${COMPRESSIONS.join(', ')}` }).optional();
export const optCompressChoice = z.enum(COMPRESS_CHOICES, { error: `must be one of ${COMPRESS_CHOICES.join(', ')}` }).optional();
/** An action's params: exactly these keys (unknown ones are refused). */
export const params = <T extends z.ZodRawShape>(shape: T) => z.strictObject(shape);
