/** Sizes the API refuses beyond: shared by the wire format (protocol.ts) and the schemas (schema.ts). */
export const MAX_REQUEST_BYTES = 1024 * 1024;
/** The most RAM one relocation.repair carries, as raw bytes after its line. */
export const MAX_REPAIR_BYTES = 1024 * 1024;
