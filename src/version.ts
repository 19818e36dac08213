/** ferry's version, shown by `ferry --version`, `host info` and api.hello. */
export const FERRY_VERSION = '0.2.0';
