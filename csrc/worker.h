/* worker.h — one I/O thread with its own libcurl multi handles.
 *
 * A worker runs an epoll loop over the sockets libcurl asks it to watch
 * (curl_multi_socket_action), with libcurl's timers folded into epoll_wait's timeout rather
 * than a timerfd (re-arming a timerfd on every timer callback cost a fifth of a profile; see
 * PERF-NOTES.md). Its transfers are spread over several multi handles ("shards") of at most
 * 64 transfers each, because libcurl 7.x walks a multi handle's whole connection cache on
 * every transfer removal and new transfer: with one multi handle the cost per request grew
 * with the number in flight. The shards share the worker's epoll set, DNS cache and TLS
 * sessions. Each round it: takes the requests the scheduler admits, starts them on pooled easy
 * handles (connections are kept alive and reused; new connections are opened a bounded number
 * per round; HTTP/2 is multiplexed when the server offers it), services its sockets, and
 * reports all finished transfers in one locked pass. An eventfd wakes it for new work,
 * cancellations and shutdown; wake-ups are coalesced.
 *
 * Requests to a plain http:// origin that h1.h's route allows (an IP literal or localhost, no
 * proxy, no header libcurl would treat specially) skip libcurl: the worker keeps its own
 * HTTP/1.1 connections to that origin in the same epoll set (tag SX_H1_TAG), writes each
 * request with one sendmsg (head and body, no copy of the body), reads the answer with h1.h's
 * reader into the same callbacks libcurl would call (on_header, on_body: hints, event streams
 * and body caps work alike), and reports the same CURLcodes, so classification and retries do
 * not know which path ran. It reuses idle connections most recent first, opens new ones within
 * the same per-round ramp, sends a request again once on a new connection when a kept-alive one
 * turns out closed before any byte of the answer (as libcurl does), and times attempts out
 * from one scan of its in-flight list per deadline.
 *
 * The worker never touches Python. Its multi handles, easy handles and buffers are its own. */
#ifndef SEMEX_WORKER_H
#define SEMEX_WORKER_H

#include "engine.h"

/* Create worker `index` of engine e (no thread yet). Returns NULL and writes a reason on
 * failure. */
sx_worker *sx_worker_new(sx_engine *e, int index, char *err, size_t errlen);

/* Start the worker's thread. Only once every worker of the engine exists: a running worker
 * may wake its siblings. Returns 0, or -1 and writes a reason. */
int sx_worker_start(sx_worker *w, char *err, size_t errlen);

/* Ask the worker to run a round soon (thread-safe, coalesced). */
void sx_worker_wake(sx_worker *w);

/* Wait for the thread to end if it was started (after e->stopping was set and the worker
 * woken). Idempotent. */
void sx_worker_join(sx_worker *w);

/* sx_worker_join, then free everything. Only once no sibling runs: a running worker may
 * wake any other (join them all first). */
void sx_worker_join_and_free(sx_worker *w);

#endif
