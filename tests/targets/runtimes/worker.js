// A node worker for procksm's real-program tests and benchmarks/runtimes.py: it holds
// the same data as every other worker started with the same seed, churns the V8 heap so
// that the garbage collector runs, and checks its own data every second.
//
//   node worker.js SEED DATA_MIB
//
// Data (DATA_MIB in all, identical across workers with the same seed):
//   buffers  4 Buffers of DATA_MIB/8 MiB each (outside the V8 heap: ArrayBuffer backing
//            stores), filled from a xorshift stream of (SEED, buffer)
//   items    DATA_MIB/2 MiB of JS objects ({id, name, values: [4 numbers]}) in an Array,
//            built before the churn starts (the V8 heap; the GC moves them)
// Churn: every 10 ms ~80 KiB of short-lived strings, objects and small Buffers, the last
// 256 kept, so scavenges run all the time and mark-compacts now and then.
// Check: once a second every buffer's sha256 and the items' FNV-1a digest are recomputed
// and compared with the digests taken at start; a mismatch goes to stderr at once.
//
// stdout: "READY pid=N data_mib=M" once the data is built and its digests taken; then, for
// each line on stdin: "status" -> "STATUS checks=N mismatches=M", "quit" -> exit.
'use strict';

const crypto = require('crypto');
const readline = require('readline');

const seed = Number(process.argv[2]);
const mib = Number(process.argv[3]);

function fill(buf, s) {
  // xorshift32 over 32-bit words; the same (seed, s) gives the same bytes everywhere
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  let x = ((seed * 2654435761) ^ (s * 40503) ^ 0x9e3779b9) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    words[i] = x;
  }
}

const buffers = [];
for (let b = 0; b < 4; b++) {
  const buf = Buffer.alloc((mib << 20) / 8);
  fill(buf, b);
  buffers.push(buf);
}

// an item with its name and values array is ~130 bytes of V8 heap: mib/2 MiB of them
const count = Math.floor((mib << 19) / 130);
const items = new Array(count);
for (let i = 0; i < count; i++) {
  const v = [i * 3, i * 5 + seed, (i * 7) % 1009, i * 11];
  items[i] = { id: i, name: `item-${i}-${(i * 2654435761 + seed) % 100003}`, values: v };
}

function itemsDigest() {
  // FNV-1a over every field (JSON.stringify and sha256 of 64 MiB of objects took ~30 %
  // of a CPU per process, once a second)
  let h = 0x811c9dc5;
  for (let i = 0; i < items.length; i++) {
    const it = items[i];
    h = Math.imul(h ^ it.id, 16777619);
    for (let k = 0; k < 4; k++) h = Math.imul(h ^ it.values[k], 16777619);
    const name = it.name;
    for (let k = 0; k < name.length; k++) h = Math.imul(h ^ name.charCodeAt(k), 16777619);
  }
  return (h >>> 0).toString(16);
}

function digests() {
  const out = buffers.map((b) => crypto.createHash('sha256').update(b).digest('hex'));
  out.push(itemsDigest());
  return out;
}

const expected = digests();
let checks = 0;
let mismatches = 0;

setInterval(() => {
  const now = digests();
  let ok = true;
  for (let k = 0; k < now.length; k++) {
    if (now[k] !== expected[k]) {
      ok = false;
      const what = k < buffers.length ? `buffer ${k}` : 'items';
      process.stderr.write(`MISMATCH ${what}: digest ${now[k]}, expected ${expected[k]}\n`);
    }
  }
  if (!ok) mismatches++;
  checks++;
}, 1000);

const kept = new Array(256);
let n = 0;
setInterval(() => {
  for (let k = 0; k < 16; k++) {
    const r = Math.floor(Math.random() * 1e9);
    let obj;
    if (k % 4 === 0) obj = Buffer.alloc(4096, r & 255);
    else if (k % 4 === 1) obj = 'churn-' + r + '-'.repeat(r % 2000);
    else obj = { r, list: [r, r + 1, r + 2], text: 'x'.repeat(r % 1000) };
    kept[n++ & 255] = obj;
  }
}, 10);

process.stdout.write(`READY pid=${process.pid} data_mib=${mib}\n`);
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const cmd = line.trim();
  if (cmd === 'status') {
    process.stdout.write(`STATUS checks=${checks} mismatches=${mismatches}\n`);
  } else if (cmd === 'quit') {
    process.exit(0);
  }
});
rl.on('close', () => process.exit(0));
