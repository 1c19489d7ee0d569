"""Ledger writers on psycopg 3 or asyncpg with the driver's default settings.

Each worker runs transfers, one transaction each: an INSERT of a ledger entry with a unique
txid and two account UPDATEs (in account order, so workers cannot deadlock), all
parameterised, so the driver prepares them as it does by default (psycopg from the fifth
execution, asyncpg from the first, in its statement cache). A committed txid is appended to
the --committed file once COMMIT returned. Workers stop when the --stop file exists; then one
JSON line goes to stdout: committed, failed (transactions begun that did not commit),
connect_errors (outside a transaction: connection attempts refused, a lost connection handed
back to the pool) and the distinct error
messages with their counts. The password comes from PGPASSWORD (both drivers read it).
"""

import argparse
import asyncio
import collections
import json
import os
import random
import re
import sys
import threading
import time

INSERT = (
    "INSERT INTO ledger_entries (txid, client, from_acct, to_acct, amount)"
    " VALUES ($1, $2, $3, $4, $5)"
)
DEBIT = "UPDATE ledger_accounts SET balance = balance - $1 WHERE id = $2"
CREDIT = "UPDATE ledger_accounts SET balance = balance + $1 WHERE id = $2"
ACCOUNTS = 100
# Bounds the run if the test never creates the stop file.
LONGEST_RUN_S = 300


class Tally:
    def __init__(self, committed_path):
        self.lock = threading.Lock()
        self.committed = 0
        self.failed = 0
        self.connect_errors = 0
        self.errors = collections.Counter()
        self.file = open(committed_path, "a", buffering=1)

    def commit(self, txid):
        with self.lock:
            self.committed += 1
            self.file.write(txid + "\n")

    def fail(self, error, connecting):
        message = " ".join(str(error).split()) or type(error).__name__
        with self.lock:
            if connecting:
                self.connect_errors += 1
            else:
                self.failed += 1
            self.errors[message] += 1

    def report(self, driver):
        self.file.close()
        module = __import__(driver)
        return {
            "driver": driver,
            "version": module.__version__,
            "committed": self.committed,
            "failed": self.failed,
            "connect_errors": self.connect_errors,
            "errors": dict(self.errors),
        }


def transfer(rng):
    first, second = rng.sample(range(1, ACCOUNTS + 1), 2)
    amount = rng.randint(1, 100)
    # Debit `first`, credit `second`; the UPDATEs run in account order.
    updates = sorted([(first, DEBIT), (second, CREDIT)])
    return first, second, amount, [(sql, amount, account) for account, sql in updates]


def stopping(args, started):
    return os.path.exists(args.stop) or time.monotonic() - started > LONGEST_RUN_S


def psycopg_conninfo(args):
    hosts, ports = zip(*(h.rsplit(":", 1) for h in args.hosts.split(",")))
    info = f"host={','.join(hosts)} port={','.join(ports)} dbname={args.dbname} user={args.user}"
    if args.read_write:
        info += " target_session_attrs=read-write"
    return info


def to_psycopg(sql):
    return re.sub(r"\$\d", "%s", sql)


def psycopg_worker(args, worker, tally, started):
    import psycopg

    # psycopg's placeholders are %s; its defaults otherwise (prepare_threshold=5).
    insert, rng, conn, seq = to_psycopg(INSERT), random.Random(worker), None, 0
    while not stopping(args, started):
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(psycopg_conninfo(args))
            except Exception as error:  # counted and reported
                tally.fail(error, connecting=True)
                time.sleep(0.05)
                continue
        seq += 1
        txid = f"{args.tag}-{worker}-{seq}"
        first, second, amount, updates = transfer(rng)
        try:
            with conn.transaction():
                conn.execute(insert, (txid, worker, first, second, amount))
                for sql, value, account in updates:
                    conn.execute(to_psycopg(sql), (value, account))
        except Exception as error:  # counted and reported
            tally.fail(error, connecting=False)
            continue
        tally.commit(txid)
    if conn is not None:
        conn.close()


def run_psycopg(args, tally):
    started = time.monotonic()
    threads = [
        threading.Thread(target=psycopg_worker, args=(args, w, tally, started))
        for w in range(1, args.workers + 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_asyncpg(args, tally):
    import asyncpg

    hosts, ports = zip(*(h.rsplit(":", 1) for h in args.hosts.split(",")))
    options = dict(
        host=list(hosts), port=[int(p) for p in ports], database=args.dbname, user=args.user
    )
    if args.read_write:
        options["target_session_attrs"] = "read-write"
    started = time.monotonic()

    async def connect():
        while not stopping(args, started):
            try:
                # The pool's defaults: statement cache of 100 per connection.
                return await asyncpg.create_pool(min_size=1, max_size=args.workers, **options)
            except Exception as error:  # counted and reported
                tally.fail(error, connecting=True)
                await asyncio.sleep(0.05)
        return None

    pool = await connect()
    if pool is None:
        return

    async def worker(number):
        rng, seq = random.Random(number), 0
        while not stopping(args, started):
            try:
                conn = await pool.acquire()
            except Exception as error:  # counted and reported
                tally.fail(error, connecting=True)
                await asyncio.sleep(0.05)
                continue
            seq += 1
            txid = f"{args.tag}-{number}-{seq}"
            first, second, amount, updates = transfer(rng)
            try:
                async with conn.transaction():
                    await conn.execute(INSERT, txid, number, first, second, amount)
                    for sql, value, account in updates:
                        await conn.execute(sql, value, account)
                tally.commit(txid)
            except Exception as error:  # counted and reported
                tally.fail(error, connecting=False)
            try:
                await pool.release(conn)
            except Exception as error:  # a lost connection: the pool replaces it
                tally.fail(error, connecting=True)

    await asyncio.gather(*(worker(w) for w in range(1, args.workers + 1)))
    await pool.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--driver", choices=["psycopg", "asyncpg"], required=True)
    parser.add_argument("--hosts", required=True, help="host:port[,host:port...]")
    parser.add_argument("--dbname", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--read-write", action="store_true", help="target_session_attrs=read-write")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tag", required=True, help="txid prefix")
    parser.add_argument("--committed", required=True, help="file the committed txids go to")
    parser.add_argument("--stop", required=True, help="workers stop once this file exists")
    args = parser.parse_args()
    tally = Tally(args.committed)
    if args.driver == "psycopg":
        run_psycopg(args, tally)
    else:
        asyncio.run(run_asyncpg(args, tally))
    print(json.dumps(tally.report(args.driver)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
