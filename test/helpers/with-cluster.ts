/** A cluster for the length of one test body. */
import { startCluster, type Cluster, type ClusterOptions } from '../../coordinator/cluster.ts';

/** Starts a cluster with `options`, hands it to `body`, and closes it whatever `body` does; `body`'s result. */
export async function withCluster<T>(options: ClusterOptions, body: (cluster: Cluster) => Promise<T>): Promise<T> {
  const cluster = await startCluster(options);
  try {
    return await body(cluster);
  } finally {
    await cluster.close();
  }
}
