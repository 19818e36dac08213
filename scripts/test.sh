#!/usr/bin/env bash
# npm test: installs what is missing, then runs every unit test (beside the code) and
# every end-to-end test (test/e2e, real QEMU guests in a real lab) with node's runner.
# Files are listed explicitly: node 20's --test expands no globs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-tests
# The second engine of test/e2e/engines.test.ts (QEMU 7.2, unpacked, not installed).
bash scripts/old-engine.sh >/dev/null
mapfile -t unit < <(find src bench -name '*.test.ts' | LC_ALL=C sort)
mapfile -t e2e < <(find test/e2e -name '*.test.ts' | LC_ALL=C sort)
if [ -n "${FERRY_TEST_ONLY:-}" ]; then
  mapfile -t e2e < <(printf '%s\n' "${e2e[@]}" | grep -E "$FERRY_TEST_ONLY" || true)
  mapfile -t unit < <(printf '%s\n' "${unit[@]}" | grep -E "$FERRY_TEST_ONLY" || true)
fi
files=("${unit[@]}" "${e2e[@]}")
[ ${#files[@]} -gt 0 ] || { echo "test: no test files found" >&2; exit 1; }
echo "test: ${#unit[@]} unit files, ${#e2e[@]} end-to-end files"
npx tsc --noEmit -p .
# The static checks: formatting (prettier), lint with the shape limits (typescript-eslint:
# max-params, max-lines-per-function), and unused files, exports and dependencies (knip).
npm run -s format:check
npm run -s lint
npm run -s unused
echo "test: types, format, lint and unused exports checked"
# The e2e files share one lab (namespaces are global), so files run one at a time.
exec node --import tsx --test --test-concurrency=1 --test-reporter=spec "${files[@]}"
