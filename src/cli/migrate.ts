import type { Command } from 'commander';
export function registerMigrate(_prog: Command): void {}
