import { FerryError } from '../errors.ts';
import type { Request } from '../api/protocol.ts';
import type { ConnContext } from '../daemon/server.ts';
import type { Host } from '../daemon/host.ts';
import type { Logger } from '../daemon/log.ts';

export class Migrations {
  constructor(readonly host: Host, readonly log: Logger) {}
  async recover(): Promise<void> {}
  async handle(req: Request, _ctx: ConnContext): Promise<unknown> {
    throw new FerryError('INTERNAL', `${req.action}: not built yet`);
  }
}
