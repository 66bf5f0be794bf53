#!/usr/bin/env bash
# Run the MCP conformance server scenarios against a running MCP endpoint.
#
#   tests/conformance/run.sh URL [extra conformance CLI options...]
#   tests/conformance/run.sh http://127.0.0.1:3000/mcp
#   tests/conformance/run.sh http://127.0.0.1:3000/mcp --scenario tools-call-sampling
#
# Installs (once, into $CONFORMANCE_DIR) Node.js 22 and
# @modelcontextprotocol/conformance from the npm registry with the machine's
# npm, then runs `conformance server --url URL --suite $CONFORMANCE_SUITE`
# under that Node 22.  Prints the CLI's output, then a table of every
# scenario with its passed/failed/warning check counts and the message of
# every failure and warning; a scenario without a single passed check shows
# as EMPTY.  Exits non-zero if any scenario has a failed check (or the CLI
# fails).  The tests (tests/conformance/results.py) also require the exact
# scenario set, no warnings and no EMPTY scenario but those they allow.
#
# Environment:
#   CONFORMANCE_DIR      install cache (default ~/.cache/mcpgw-conformance)
#   CONFORMANCE_SUITE    all | active | pending (default all)
#   CONFORMANCE_RESULTS  where checks.json files go (default: a new temp dir)
set -euo pipefail

CONFORMANCE_VERSION=0.1.16
NODE_MAJOR=22

if [ $# -lt 1 ]; then
    echo "usage: $0 URL [conformance server options...]" >&2
    exit 2
fi
url=$1
shift

dir=${CONFORMANCE_DIR:-$HOME/.cache/mcpgw-conformance}
suite=${CONFORMANCE_SUITE:-all}
results=${CONFORMANCE_RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/mcpgw-conformance.XXXXXX")}
node_bin=$dir/node_modules/node/bin/node
cli=$dir/node_modules/@modelcontextprotocol/conformance/dist/index.js

installed_ok() {
    [ -x "$node_bin" ] && [ -f "$cli" ] || return 1
    "$node_bin" --version 2>/dev/null | grep -q "^v$NODE_MAJOR\." || return 1
    "$node_bin" -p "require('$dir/node_modules/@modelcontextprotocol/conformance/package.json').version" \
        2>/dev/null | grep -qx "$CONFORMANCE_VERSION"
}

# Parallel test workers share the cache: one installs, the others wait on the lock and then find it.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if ! installed_ok; then
    echo "Installing node@$NODE_MAJOR and @modelcontextprotocol/conformance@$CONFORMANCE_VERSION into $dir" >&2
    command -v npm >/dev/null || { echo "npm is required to install the conformance suite" >&2; exit 2; }
    mkdir -p "$dir"
    # The node package ships its binary via a preinstall script: allow it explicitly.
    printf '{"private": true, "allowScripts": {"node": true}}\n' > "$dir/package.json"
    (cd "$dir" && npm install --no-audit --no-fund --save-exact --loglevel=error \
        "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION" "node@$NODE_MAJOR") >&2
    installed_ok || { echo "conformance install in $dir is unusable" >&2; exit 2; }
fi
flock -u 9

mkdir -p "$results"
echo "conformance $CONFORMANCE_VERSION, node $("$node_bin" --version), suite $suite, url $url"
echo "results: $results"

set +e
"$node_bin" "$cli" server --url "$url" --suite "$suite" --output-dir "$results" "$@"
cli_status=$?
set -e

# Results table from the saved checks.json files (one directory per scenario).
set +e
"$node_bin" - "$results" <<'EOF'
const fs = require('fs');
const path = require('path');
const root = process.argv[2];
const rows = [];
const stamp = /-(\d{4}-\d\d-\d\dT[\d-]+Z)$/;
const entries = fs.readdirSync(root).filter((e) => stamp.test(e));
entries.sort((a, b) => a.match(stamp)[1].localeCompare(b.match(stamp)[1]));  // run order
for (const entry of entries) {
  const file = path.join(root, entry, 'checks.json');
  if (!fs.existsSync(file)) continue;
  const scenario = entry.replace(/^server-/, '').replace(stamp, '');
  const checks = JSON.parse(fs.readFileSync(file, 'utf8'));
  const count = (s) => checks.filter((c) => c.status === s).length;
  const problems = checks
    .filter((c) => c.status === 'FAILURE' || c.status === 'WARNING')
    .map((c) => `${c.status === 'FAILURE' ? 'FAIL' : 'warn'} ${c.id}: ${c.errorMessage || c.description}`);
  rows.push({ scenario, passed: count('SUCCESS'), failed: count('FAILURE'),
              warnings: count('WARNING'), problems });
}
const width = Math.max(8, ...rows.map((r) => r.scenario.length));
console.log('\n=== CONFORMANCE RESULTS ===');
console.log(`${'scenario'.padEnd(width)}  result  passed  failed  warnings`);
for (const r of rows) {
  const result = r.failed ? 'FAIL' : (r.passed ? 'PASS' : 'EMPTY');
  console.log(`${r.scenario.padEnd(width)}  ${result.padEnd(6)}  ${String(r.passed).padStart(6)}  ` +
              `${String(r.failed).padStart(6)}  ${String(r.warnings).padStart(8)}`);
  for (const p of r.problems) console.log(`    ${p}`);
}
const failed = rows.filter((r) => r.failed).length;
const warned = rows.filter((r) => r.warnings).length;
const empty = rows.filter((r) => !r.failed && !r.passed).length;
console.log(`\nscenarios: ${rows.length - failed} passed, ${failed} failed ` +
            `(${warned} with warnings, ${empty} with no passed check)`);
process.exit(failed ? 1 : 0);
EOF
table_status=$?
set -e

if [ "$cli_status" -ne 0 ] || [ "$table_status" -ne 0 ]; then
    exit 1
fi
