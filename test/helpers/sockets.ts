/** What a process listens on and what a rogue socket receives, for tests of the worker transports. */
import { readFileSync, readdirSync, readlinkSync } from 'node:fs';
import type * as zmq from 'zeromq';

/** The TCP ports process `pid` listens on (IPv4 and IPv6). */
export function listeningPorts(pid: number): number[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const inode = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
      if (inode) inodes.add(inode);
    } catch {
      // closed meanwhile
    }
  }
  return ['/proc/net/tcp', '/proc/net/tcp6'].flatMap((table) =>
    readFileSync(table, 'utf8')
      .split('\n')
      .slice(1)
      .map((line) => line.trim().split(/\s+/))
      .filter((f) => f[3] === '0A' && inodes.has(f[9] ?? ''))
      .map((f) => parseInt(f[1]!.split(':').at(-1)!, 16)),
  );
}

/** Everything a socket receives goes into `into`, until it is closed. */
export function listen(socket: zmq.Dealer, into: Buffer[][]): void {
  void (async () => {
    while (!socket.closed) {
      try {
        into.push(await socket.receive());
      } catch {
        // a receive timeout (keep listening) or the socket closed (the loop ends)
      }
    }
  })();
}

/** The value of `flag` on process `pid`'s command line. */
export function argOf(pid: number, flag: string): string | undefined {
  const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  const at = argv.indexOf(flag);
  return at < 0 ? undefined : argv[at + 1];
}
