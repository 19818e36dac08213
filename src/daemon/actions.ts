/**
 * The API's actions, mapped onto the host (and, for migration.* and relocation.*, onto
 * the migration layer). One switch over the closed set in api/protocol.ts.
 */
import { FerryError } from '../errors.ts';
import type { Request } from '../api/protocol.ts';
import { API_VERSION } from '../api/protocol.ts';
import type { Host } from './host.ts';
import { FERRY_VERSION } from '../version.ts';
import type { ConnContext } from './server.ts';

export interface MigrationApi {
  handle(req: Request, ctx: ConnContext): Promise<unknown>;
}

export function makeHandler(host: Host, migration: MigrationApi | undefined) {
  return async (req: Request, ctx: ConnContext): Promise<unknown> => {
    const p = req.params as Record<string, any>;
    switch (req.action) {
      case 'api.hello': return { apiVersion: API_VERSION, version: FERRY_VERSION, host: host.cfg.name, caller: ctx.caller };
      case 'host.info': return host.info();
      case 'domain.list': return [...host.domains.values()].map((l) => host.summary(l)).sort((a, b) => String(a.name).localeCompare(String(b.name)));
      case 'domain.info': return host.domainInfo(p.domain);
      case 'domain.create': return host.create(p.config, p.start !== false);
      case 'domain.start': return host.start(p.domain);
      case 'domain.pause': return host.pause(p.domain);
      case 'domain.unpause': return host.unpause(p.domain);
      case 'domain.shutdown': return host.shutdown(p.domain, p.timeoutS ?? 60);
      case 'domain.destroy': return host.destroy(p.domain);
      case 'domain.delete': return host.delete(p.domain);
      case 'domain.save': return host.save(p.domain, p.file, { anyPath: p.anyPath, local: ctx.caller.role === 'local' });
      case 'domain.restore': return host.restore(p.file, { anyPath: p.anyPath, local: ctx.caller.role === 'local' });
      case 'domain.sample-memory': return host.sampleMemory(p.domain, p.startMiB, p.endMiB);
      case 'console.attach': {
        host.get(p.domain); // DOMAIN_NOT_FOUND before switching to raw
        ctx.send({ id: req.id, result: { attached: p.domain, host: host.cfg.name } });
        ctx.goRaw();
        host.attachConsole(p.domain, ctx.socket, p.replay ?? 0);
        return undefined;
      }
      case 'events.subscribe': {
        const want = p.domain as string | undefined;
        const fwd = (name: string) => (data: { domain?: string }) => { if (!want || data.domain === want) ctx.send({ event: name, data }); };
        const names = ['domain.state', 'migration.progress', 'migration.phase', 'migration.done'];
        const fns = names.map((n) => { const f = fwd(n); host.on(n, f); return [n, f] as const; });
        ctx.onClose(() => { for (const [n, f] of fns) host.off(n, f); });
        return { subscribed: names };
      }
      case 'migration.start':
      case 'migration.cancel':
      case 'migration.jobs':
      case 'migration.job':
      case 'migration.resolve':
      case 'relocation.begin':
      case 'relocation.prepare':
      case 'relocation.digest':
      case 'relocation.repair':
      case 'relocation.finish':
      case 'relocation.abandon':
      case 'relocation.confirm':
      case 'relocation.status':
        if (!migration) throw new FerryError('INTERNAL', 'migration is not available in this ferryd');
        return migration.handle(req, ctx);
      default: {
        const never: never = req.action;
        throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action ${String(never)}`);
      }
    }
  };
}
