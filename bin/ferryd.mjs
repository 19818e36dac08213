#!/usr/bin/env node
// The ferry host daemon. TypeScript sources run through tsx's loader (no build step).
import { register } from 'tsx/esm/api';
register();
await import('../src/daemon/main.ts');
