/** ferryd.log's levels, apart from the logger: the config (and so the CLI, which checks configs) needs them, not pino. */
export type Level = 'debug' | 'info' | 'warn' | 'error';
export const LEVELS: readonly Level[] = ['debug', 'info', 'warn', 'error'];
