// Holds an advisory lock with the npm package advisory-lock, for pglocks'
// interop tests.
//
// usage: node node_lock.js NAME wait|nowait   (DATABASE_URL names the database)
// Prints "acquired" or "not acquired", then holds the lock until standard
// input closes.
const createMutex = require("advisory-lock").default(process.env.DATABASE_URL);

const [name, mode] = process.argv.slice(2);
(async () => {
  const mutex = createMutex(name);
  const unlock = mode === "wait" ? await mutex.lock() : await mutex.tryLock();
  console.log(unlock ? "acquired" : "not acquired");
  process.stdin.resume();
  process.stdin.on("end", async () => {
    if (unlock) await unlock();
    process.exit(0);
  });
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
