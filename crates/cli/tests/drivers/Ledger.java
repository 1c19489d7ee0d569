// Ledger writers on pgjdbc through a HikariCP pool, both with their default settings: pgjdbc
// switches a statement to a named server-side prepared statement from its fifth execution
// (prepareThreshold=5), HikariCP keeps up to ten connections and waits up to 30 s for one.
//
// Each worker runs transfers, one transaction each: an INSERT of a ledger entry with a unique
// txid and two account UPDATEs in account order. A committed txid is appended to --committed
// once commit() returned. The JDBC URL lists every --hosts entry; with --read-write it adds
// targetServerType=primary (pgjdbc then skips a server whose transaction_read_only is on).
// Workers stop once the --stop file exists; then one JSON line goes to stdout (see
// ledger.py). The password comes from PGPASSWORD.

import com.zaxxer.hikari.HikariConfig;
import com.zaxxer.hikari.HikariDataSource;
import java.io.FileWriter;
import java.io.IOException;
import java.io.InputStream;
import java.io.Writer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.PreparedStatement;
import java.sql.SQLException;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import java.util.concurrent.ThreadLocalRandom;

public final class Ledger {
    private static final int ACCOUNTS = 100;
    private static final long LONGEST_RUN_MS = 300_000;
    private static final String INSERT =
            "INSERT INTO ledger_entries (txid, client, from_acct, to_acct, amount) VALUES (?, ?, ?, ?, ?)";
    private static final String DEBIT = "UPDATE ledger_accounts SET balance = balance - ? WHERE id = ?";
    private static final String CREDIT = "UPDATE ledger_accounts SET balance = balance + ? WHERE id = ?";

    private final Map<String, String> args;
    private final Path stop;
    private final long started = System.currentTimeMillis();
    private final Writer committedFile;
    private final Map<String, Integer> errors = new TreeMap<>();
    private long committed;
    private long failed;
    private long connectErrors;

    private Ledger(Map<String, String> args) throws IOException {
        this.args = args;
        this.stop = Path.of(required("stop"));
        this.committedFile = new FileWriter(required("committed"), true);
    }

    private String required(String key) {
        String value = args.get(key);
        if (value == null) {
            throw new IllegalArgumentException("--" + key + " is required");
        }
        return value;
    }

    private boolean stopping() {
        return Files.exists(stop) || System.currentTimeMillis() - started > LONGEST_RUN_MS;
    }

    private synchronized void commit(String txid) throws IOException {
        committed++;
        committedFile.write(txid + "\n");
        committedFile.flush();
    }

    private synchronized void fail(Exception error, boolean connecting) {
        String message = String.valueOf(error.getMessage()).trim().replaceAll("\\s+", " ");
        if (connecting) {
            connectErrors++;
        } else {
            failed++;
        }
        errors.merge(message, 1, Integer::sum);
    }

    private void worker(HikariDataSource pool, int number) {
        long seq = 0;
        ThreadLocalRandom random = ThreadLocalRandom.current();
        while (!stopping()) {
            Connection conn;
            try {
                conn = pool.getConnection();
            } catch (SQLException error) {
                fail(error, true);
                continue;
            }
            seq++;
            String txid = required("tag") + "-" + number + "-" + seq;
            int first = random.nextInt(1, ACCOUNTS + 1);
            int second = random.nextInt(1, ACCOUNTS);
            if (second >= first) {
                second++;
            }
            int amount = random.nextInt(1, 101);
            try (conn) {
                conn.setAutoCommit(false);
                try (PreparedStatement insert = conn.prepareStatement(INSERT)) {
                    insert.setString(1, txid);
                    insert.setInt(2, number);
                    insert.setInt(3, first);
                    insert.setInt(4, second);
                    insert.setLong(5, amount);
                    insert.executeUpdate();
                }
                // In account order, so workers cannot deadlock.
                update(conn, first < second ? DEBIT : CREDIT, amount, Math.min(first, second));
                update(conn, first < second ? CREDIT : DEBIT, amount, Math.max(first, second));
                conn.commit();
            } catch (SQLException error) {
                // HikariCP rolls back a connection returned with a transaction open.
                fail(error, false);
                continue;
            }
            try {
                commit(txid);
            } catch (IOException error) {
                throw new RuntimeException(error);
            }
        }
    }

    private static void update(Connection conn, String sql, int amount, int account) throws SQLException {
        try (PreparedStatement update = conn.prepareStatement(sql)) {
            update.setLong(1, amount);
            update.setInt(2, account);
            update.executeUpdate();
        }
    }

    private void run() throws Exception {
        List<String> hosts = List.of(required("hosts").split(","));
        String url = "jdbc:postgresql://" + String.join(",", hosts) + "/" + required("dbname");
        if (args.containsKey("read-write")) {
            url += "?targetServerType=primary";
        }
        HikariConfig config = new HikariConfig();
        config.setJdbcUrl(url);
        config.setUsername(required("user"));
        config.setPassword(System.getenv("PGPASSWORD"));
        int workers = Integer.parseInt(args.getOrDefault("workers", "4"));
        try (HikariDataSource pool = new HikariDataSource(config)) {
            List<Thread> threads = new ArrayList<>();
            for (int w = 1; w <= workers; w++) {
                int number = w;
                Thread thread = new Thread(() -> worker(pool, number));
                thread.start();
                threads.add(thread);
            }
            for (Thread thread : threads) {
                thread.join();
            }
        }
        committedFile.close();
        String version = "pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ", HikariCP "
                + hikariVersion();
        StringBuilder json = new StringBuilder("{\"driver\":\"pgjdbc\",\"version\":")
                .append(quote(version)).append(",\"committed\":")
                .append(committed).append(",\"failed\":").append(failed)
                .append(",\"connect_errors\":").append(connectErrors).append(",\"errors\":{");
        String separator = "";
        for (Map.Entry<String, Integer> entry : errors.entrySet()) {
            json.append(separator).append(quote(entry.getKey())).append(':').append(entry.getValue());
            separator = ",";
        }
        System.out.println(json.append("}}"));
    }

    private static String hikariVersion() throws IOException {
        Properties pom = new Properties();
        try (InputStream in = HikariDataSource.class.getResourceAsStream(
                "/META-INF/maven/com.zaxxer/HikariCP/pom.properties")) {
            pom.load(in);
        }
        return pom.getProperty("version");
    }

    private static String quote(String text) {
        StringBuilder quoted = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                quoted.append('\\').append(c);
            } else if (c < 0x20) {
                quoted.append(String.format("\\u%04x", (int) c));
            } else {
                quoted.append(c);
            }
        }
        return quoted.append('"').toString();
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = new TreeMap<>();
        for (int i = 0; i < argv.length; i++) {
            String key = argv[i].substring(2);
            if (key.equals("read-write")) {
                args.put(key, "");
            } else {
                args.put(key, argv[++i]);
            }
        }
        new Ledger(args).run();
    }
}
