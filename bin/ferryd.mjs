#!/usr/bin/env node
// The ferry host daemon, from the bundle in dist/ (`npm run build`).
import { dist } from './dist.mjs';
await import(dist('daemon/main.js'));
