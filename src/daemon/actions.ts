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

export function makeHandler(host: Host, migration: Migrations | undefined) {
  const mig = (): Migrations => {
    if (!migration) throw new FerryError('INTERNAL', 'migration is not available in this ferryd');
    return migration;
  };
  return async (req: Request, ctx: ConnContext): Promise<unknown> => {
    // Each case sees its own action's validated params (api/protocol.ts ACTIONS).
    switch (req.action) {
      case 'api.hello': return { apiVersion: API_VERSION, version: FERRY_VERSION, host: host.cfg.name, caller: ctx.caller };
      case 'host.info': return host.info();
      case 'domain.list': return [...host.domains.values()].map((l) => host.summary(l)).sort((a, b) => String(a.name).localeCompare(String(b.name)));
      case 'domain.info': return host.domainInfo(req.params.domain);
      case 'domain.create': return host.create(req.params.config, req.params.start !== false);
      case 'domain.start': return host.start(req.params.domain);
      case 'domain.pause': return host.pause(req.params.domain);
      case 'domain.unpause': return host.unpause(req.params.domain);
      case 'domain.shutdown': return host.shutdown(req.params.domain, req.params.timeoutS ?? 60);
      case 'domain.destroy': return host.destroy(req.params.domain);
      case 'domain.delete': return host.delete(req.params.domain);
      case 'domain.save': return host.save(req.params.domain, req.params.file, { anyPath: req.params.anyPath, local: ctx.caller.role === 'local' });
      case 'domain.restore': return host.restore(req.params.file, { anyPath: req.params.anyPath, local: ctx.caller.role === 'local' });
      case 'domain.sample-memory': return host.sampleMemory(req.params.domain, req.params.startMiB, req.params.endMiB);
      case 'console.attach': {
        host.get(req.params.domain); // DOMAIN_NOT_FOUND before switching to raw
        ctx.send({ id: req.id, result: { attached: req.params.domain, host: host.cfg.name } });
        ctx.goRaw();
        host.attachConsole(req.params.domain, ctx.socket, req.params.replay ?? 0);
        return undefined;
      }
      case 'events.subscribe': {
        const want = req.params.domain;
        const fwd = (name: string) => (data: { domain?: string }) => { if (!want || data.domain === want) ctx.send({ event: name, data }); };
        const names = ['domain.state', 'migration.progress', 'migration.phase', 'migration.waiting', 'migration.settled', 'migration.done'];
        const fns = names.map((n) => { const f = fwd(n); host.on(n, f); return [n, f] as const; });
        ctx.onClose(() => { for (const [n, f] of fns) host.off(n, f); });
        return { subscribed: names };
      }
      // The migration layer: the source side for the operator, the destination side for peers.
      case 'migration.start': return mig().source.start(req.params);
      case 'migration.cancel': return mig().source.cancel(req.params.domain);
      case 'migration.resolve': return mig().source.resolveByOperator(req.params.domain, req.params.assume);
      case 'migration.jobs': return mig().jobs();
      case 'migration.job': return mig().job(req.params.domain);
      case 'relocation.begin': return mig().dest.begin(req.params, ctx);
      case 'relocation.prepare': return mig().dest.prepare(req.params, ctx);
      case 'relocation.digest': return mig().dest.digest(req.params, ctx);
      case 'relocation.repair': return mig().dest.repair(req.params, ctx, req.attachment);
      case 'relocation.finish': return mig().dest.finish(req.params, ctx);
      case 'relocation.abandon': return mig().dest.abandon(req.params, ctx);
      case 'relocation.confirm': return mig().dest.confirm(req.params, ctx);
      case 'relocation.status': return mig().dest.status(req.params, ctx);
      default: {
        const never: never = req;
        throw new FerryError('API_UNKNOWN_ACTION', `Unknown API action ${String((never as { action: unknown }).action)}`);
      }
    }
  };
}
