// Ledger writers on node-postgres (`pg`) with its default settings and named prepared
// statements (`{name, text, values}`), as applications use them: node-postgres parses a
// named statement once per connection and then only binds and executes it.
//
// Each worker holds one pg.Client and runs transfers, one transaction each: an INSERT of a
// ledger entry with a unique txid and two account UPDATEs in account order. A committed txid
// is appended to --committed once COMMIT returned. node-postgres has no multi-host or
// target_session_attrs setting: with --read-write the worker does what such an application
// must do itself, trying each of --hosts in turn after a connection is lost and keeping the
// first whose `SHOW transaction_read_only` is off. Workers stop once the --stop file exists;
// then one JSON line goes to stdout (see ledger.py). The password comes from PGPASSWORD.
"use strict";

const fs = require("fs");
const { Client } = require("pg");

const ACCOUNTS = 100;
const LONGEST_RUN_MS = 300000;
const INSERT = {
  name: "ledger_insert",
  text: "INSERT INTO ledger_entries (txid, client, from_acct, to_acct, amount) VALUES ($1, $2, $3, $4, $5)",
};
const DEBIT = { name: "ledger_debit", text: "UPDATE ledger_accounts SET balance = balance - $1 WHERE id = $2" };
const CREDIT = { name: "ledger_credit", text: "UPDATE ledger_accounts SET balance = balance + $1 WHERE id = $2" };

function parseArgs(argv) {
  const args = { workers: 4, readWrite: false };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    if (key === "--read-write") args.readWrite = true;
    else if (["--hosts", "--dbname", "--user", "--tag", "--committed", "--stop", "--workers"].includes(key)) {
      args[key.slice(2)] = argv[++i];
    } else throw new Error(`unknown argument ${key}`);
  }
  for (const key of ["hosts", "dbname", "user", "tag", "committed", "stop"]) {
    if (!args[key]) throw new Error(`--${key} is required`);
  }
  args.workers = Number(args.workers);
  args.hosts = args.hosts.split(",").map((h) => {
    const at = h.lastIndexOf(":");
    return { host: h.slice(0, at), port: Number(h.slice(at + 1)) };
  });
  return args;
}

const args = parseArgs(process.argv.slice(2));
const started = Date.now();
const committedFile = fs.openSync(args.committed, "a");
const tally = { committed: 0, failed: 0, connect_errors: 0, errors: {} };

function fail(error, connecting) {
  const message = String(error && error.message ? error.message : error).split(/\s+/).join(" ");
  if (connecting) tally.connect_errors++;
  else tally.failed++;
  tally.errors[message] = (tally.errors[message] || 0) + 1;
}

const stopping = () => fs.existsSync(args.stop) || Date.now() - started > LONGEST_RUN_MS;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A connected client on the first host that takes it (and, with --read-write, takes writes).
async function connect() {
  let lastError;
  for (const { host, port } of args.hosts) {
    const client = new Client({ host, port, database: args.dbname, user: args.user });
    // A connection lost while idle is reported here; the next query then fails and is counted.
    client.on("error", () => {});
    try {
      await client.connect();
      if (args.readWrite) {
        const shown = await client.query("SHOW transaction_read_only");
        if (shown.rows[0].transaction_read_only !== "off") {
          await client.end();
          lastError = new Error(`${host}:${port} is read-only`);
          continue;
        }
      }
      return client;
    } catch (error) {
      lastError = error;
      client.end().catch(() => {});
    }
  }
  throw lastError;
}

function randomInt(low, high) {
  return low + Math.floor(Math.random() * (high - low + 1));
}

async function worker(number) {
  let client = null;
  let seq = 0;
  while (!stopping()) {
    if (client === null) {
      try {
        client = await connect();
      } catch (error) {
        fail(error, true);
        await sleep(50);
        continue;
      }
    }
    seq++;
    const txid = `${args.tag}-${number}-${seq}`;
    const first = randomInt(1, ACCOUNTS);
    let second = randomInt(1, ACCOUNTS - 1);
    if (second >= first) second++;
    const amount = randomInt(1, 100);
    const updates = [
      [first, DEBIT],
      [second, CREDIT],
    ].sort((a, b) => a[0] - b[0]);
    try {
      await client.query("BEGIN");
      await client.query({ ...INSERT, values: [txid, number, first, second, amount] });
      for (const [account, statement] of updates) {
        await client.query({ ...statement, values: [amount, account] });
      }
      await client.query("COMMIT");
    } catch (error) {
      fail(error, false);
      // A server error leaves the transaction aborted; a lost connection needs a new client.
      try {
        await client.query("ROLLBACK");
      } catch {
        client.end().catch(() => {});
        client = null;
      }
      continue;
    }
    tally.committed++;
    fs.writeSync(committedFile, txid + "\n");
  }
  if (client !== null) await client.end().catch(() => {});
}

async function main() {
  const workers = [];
  for (let w = 1; w <= args.workers; w++) workers.push(worker(w));
  await Promise.all(workers);
  fs.closeSync(committedFile);
  process.stdout.write(JSON.stringify({ driver: "node-postgres", version: require("pg/package.json").version, ...tally }) + "\n");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
