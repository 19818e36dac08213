#!/usr/bin/env node
// The ferry CLI, from the bundle in dist/ (`npm run build`; setup and `npm ci` run it).
import { dist } from './dist.mjs';
const { main } = await import(dist('cli/main.js'));
await main(process.argv);
