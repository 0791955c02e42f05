/*
 * A JVM worker for procksm's real-program tests and benchmarks/runtimes.py: it holds the
 * same data as every other worker started with the same seed, churns the heap so that G1
 * collects, and checks its own data every second.
 *
 *   java -Xms256m -Xmx256m -XX:+AlwaysPreTouch -XX:+UseG1GC Worker.java SEED DATA_MIB
 *
 * Data (DATA_MIB in all, identical across workers with the same seed):
 *   blob     byte[] of DATA_MIB/2 MiB from java.util.Random(SEED)       (humongous: never moved)
 *   longs    long[] of DATA_MIB/4 MiB, longs[i] = mix(SEED, i)          (humongous)
 *   items    DATA_MIB/4 MiB of small objects (Item: id, name, long[4]) in an ArrayList,
 *            allocated before the churn starts; G1 moves them (young to old gen)
 * Churn: a thread allocates ~8 MiB/s of short-lived byte[], strings and Items and keeps
 * the last 256 of them, so young collections run every few seconds.
 * Check: a thread recomputes a 64-bit digest of blob, longs and every Item once a second
 * and compares it with the digests taken at start; a mismatch goes to stderr at once.
 *
 * stdout: "READY pid=N data_mib=M" once the data is built and its digests taken; then, for each
 * line on stdin: "status" -> "STATUS checks=N mismatches=M", "quit" -> exit.
 */

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.ArrayList;
import java.util.Random;
import java.util.concurrent.atomic.AtomicLong;

public class Worker {
    static final class Item {
        final int id;
        final String name;
        final long[] values;

        Item(int id, String name, long[] values) {
            this.id = id;
            this.name = name;
            this.values = values;
        }
    }

    static byte[] blob;
    static long[] longs;
    static ArrayList<Item> items;
    static final AtomicLong checks = new AtomicLong();
    static final AtomicLong mismatches = new AtomicLong();

    static long mix(long seed, long i) {
        long z = seed * 0x9E3779B97F4A7C15L + i * 0xBF58476D1CE4E5B9L;
        z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9L;
        z = (z ^ (z >>> 27)) * 0x94D049BB133111EBL;
        return z ^ (z >>> 31);
    }

    static Item item(long seed, int i) {
        long[] v = new long[4];
        for (int k = 0; k < 4; k++) {
            v[k] = mix(seed, ((long) i << 2) | k);
        }
        return new Item(i, "item-" + i + "-" + Long.toHexString(v[0]), v);
    }

    static long digestBytes(byte[] a) {
        long h = 0x243F6A8885A308D3L;
        for (int i = 0; i + 8 <= a.length; i += 8) {
            long w = 0;
            for (int k = 0; k < 8; k++) {
                w = (w << 8) | (a[i + k] & 0xffL);
            }
            h = (h ^ w) * 0x100000001B3L;
        }
        return h;
    }

    static long digestLongs(long[] a) {
        long h = 0x13198A2E03707344L;
        for (long w : a) {
            h = (h ^ w) * 0x100000001B3L;
        }
        return h;
    }

    static long digestItems(ArrayList<Item> list) {
        long h = 0xA4093822299F31D0L;
        for (Item it : list) {
            h = (h ^ it.id) * 0x100000001B3L;
            h = (h ^ it.name.hashCode()) * 0x100000001B3L;
            h = (h ^ digestLongs(it.values)) * 0x100000001B3L;
        }
        return h;
    }

    static long[] digests() {
        return new long[] {digestBytes(blob), digestLongs(longs), digestItems(items)};
    }

    static void checkLoop(long[] expected) {
        String[] names = {"blob", "longs", "items"};
        while (true) {
            try {
                Thread.sleep(1000);
            } catch (InterruptedException e) {
                return;
            }
            long[] now = digests();
            boolean ok = true;
            for (int k = 0; k < now.length; k++) {
                if (now[k] != expected[k]) {
                    ok = false;
                    System.err.printf("MISMATCH %s: digest %x, expected %x%n",
                            names[k], now[k], expected[k]);
                }
            }
            if (!ok) {
                mismatches.incrementAndGet();
            }
            checks.incrementAndGet();
        }
    }

    static void churnLoop(long seed) {
        Object[] kept = new Object[256];
        Random r = new Random(seed ^ ProcessHandle.current().pid());
        long n = 0;
        while (true) {
            // ~80 KiB per 10 ms: about 8 MiB/s of garbage, a little of it kept a while
            for (int k = 0; k < 16; k++) {
                byte[] b = new byte[4096];
                r.nextBytes(b);
                kept[(int) (n++ & 255)] = (k & 1) == 0 ? b : item(seed, r.nextInt()).name;
            }
            try {
                Thread.sleep(10);
            } catch (InterruptedException e) {
                return;
            }
        }
    }

    public static void main(String[] args) throws Exception {
        long seed = Long.parseLong(args[0]);
        int mib = Integer.parseInt(args[1]);
        blob = new byte[mib << 19];
        new Random(seed).nextBytes(blob);
        longs = new long[mib << 15];
        for (int i = 0; i < longs.length; i++) {
            longs[i] = mix(seed, i);
        }
        // an Item with its name and values is ~150 bytes: mib/4 MiB of them
        int count = (mib << 18) / 150;
        items = new ArrayList<>(count);
        for (int i = 0; i < count; i++) {
            items.add(item(seed, i));
        }
        long[] expected = digests();
        Thread checker = new Thread(() -> checkLoop(expected), "checker");
        checker.setDaemon(true);
        checker.start();
        Thread churn = new Thread(() -> churnLoop(seed), "churn");
        churn.setDaemon(true);
        churn.start();
        System.out.println("READY pid=" + ProcessHandle.current().pid() + " data_mib=" + mib);
        System.out.flush();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            line = line.trim();
            if (line.equals("status")) {
                System.out.println("STATUS checks=" + checks.get() + " mismatches="
                        + mismatches.get());
                System.out.flush();
            } else if (line.equals("quit")) {
                break;
            }
        }
        System.exit(0);
    }
}
