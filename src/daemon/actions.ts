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
import type { Migrations } from '../migration/manager.ts';
import type { StartParams } from '../migration/source.ts';

export function makeHandler(host: Host, migration: Migrations | undefined) {
  const mig = (): Migrations => {
    if (!migration) throw new FerryError('INTERNAL', 'migration is not available in this ferryd');
    return migration;
  };
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
        const names = ['domain.state', 'migration.progress', 'migration.phase', 'migration.waiting', 'migration.settled', 'migration.done'];
        const fns = names.map((n) => { const f = fwd(n); host.on(n, f); return [n, f] as const; });
        ctx.onClose(() => { for (const [n, f] of fns) host.off(n, f); });
        return { subscribed: names };
      }
      // The migration layer: the source side for the operator, the destination side for peers.
      case 'migration.start': return mig().source.start(p as StartParams);
      case 'migration.cancel': return mig().source.cancel(p.domain);
      case 'migration.resolve': return mig().source.resolveByOperator(p.domain, p.assume === 'source' ? 'source' : 'destination');
      case 'migration.jobs': return mig().jobs();
      case 'migration.job': return mig().job(p.domain);
      case 'relocation.begin': return mig().dest.begin(p, ctx);
      case 'relocation.prepare': return mig().dest.prepare(p, ctx);
      case 'relocation.digest': return mig().dest.digest(p, ctx);
      case 'relocation.repair': return mig().dest.repair(p, ctx, req.attachment);
      case 'relocation.finish': return mig().dest.finish(p, ctx);
      case 'relocation.abandon': return mig().dest.abandon(p, ctx);
      case 'relocation.confirm': return mig().dest.confirm(p, ctx);
      case 'relocation.status': return mig().dest.status(p, ctx);
      default: {
        const never: never = req.action;
        throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action ${String(never)}`);
      }
    }
  };
}
