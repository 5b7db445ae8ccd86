/* main.c - mockserver's options, listeners and worker threads (see mock.h) */
#include "mock.h"

cfg_t cfg = {
    .host = "127.0.0.1",
    .port = 0,
    .threads = 1,
    .stall_timeout_ms = 60000.0,
    .seed = 42,
    .embed_dim = EMBED_DIM,
    .bare_burst = 20,
    .batch_seconds = 1.0,
    .batch_max_requests = 50000,
};

uint64_t g_created; /* unix time at start: "created" of every completion */

/* ------------------------------------------------------------------- setup */

static void usage(FILE *f) {
    fputs("usage: mockserver [options]\n"
          "  --host ADDR            127.x.x.x address to listen on (default 127.0.0.1)\n"
          "  --port N               port, 0 = ephemeral (default 0); prints 'PORT <n>'\n"
          "  --threads N            worker threads (default 1)\n"
          "  --latency-ms MS        mean response delay (default 0)\n"
          "  --jitter-ms MS         uniform jitter: delay in [MEAN-J, MEAN+J], clamped at 0\n"
          "  --rpm N / --tpm N      token-bucket rate limits (429 when exceeded); a request\n"
          "                         costs body bytes/4 tokens\n"
          "  --tpm-usage            --tpm counts what answers use instead: a request needs its\n"
          "                         prompt's tokens (body bytes/4) to be admitted, and then\n"
          "                         costs its usage (prompt + completion: the level may go\n"
          "                         below zero); GET /_stats usage_tokens sums the 200s' usage\n"
          "  --embed-tpm N          embeddings' tokens in a bucket of their own (default: --tpm)\n"
          "  --bare-rate R          a limiter answering bare 429s (no headers) above R req/s\n"
          "  --bare-burst B         its bucket size (default 20)\n"
          "  --bare-halve-at S      halve its rate S seconds after the first request...\n"
          "  --bare-restore-at S    ...and restore it at S seconds\n"
          "  --fail-rate P          reply 500/503 (alternating) with probability P\n"
          "  --drop-rate P          close the connection after reading the request\n"
          "  --truncate-rate P      send headers and half of the body, then close\n"
          "  --stall-rate P         never answer; close after --stall-timeout-ms\n"
          "  --stall-timeout-ms MS  (default 60000)\n"
          "  --seed N               PRNG seed for faults and jitter (default 42)\n"
          "  --stdin-watch          exit when stdin reaches EOF\n"
          "  --embed-dim N          embedding length when a request has no \"dimensions\" (default 8)\n"
          "  --batch-seconds S      Batch API: a batch's life from created to completed (default 1)\n"
          "  --batch-error-every K  Batch API: every K-th line is a 400 in the error file\n"
          "  --batch-transient-every K  ... every K-th line is a 500 in the error file\n"
          "  --batch-expire-at F    Batch API: batches expire with the first F (0-1) of their lines\n"
          "                         done; the rest are batch_expired lines in the error file\n"
          "  --batch-fail           Batch API: every batch fails validation\n"
          "  --batch-max-requests N Batch API: a batch of more lines fails validation (default 50000)\n"
          "\n"
          "POST .../embeddings answers one vector per input (a string, or each element of an\n"
          "array), hashed from the input's JSON bytes: values in [-1, 1) with six decimals;\n"
          "\"encoding_format\":\"base64\" gives them as base64 little-endian float32.\n"
          "POST .../chat/completions answers \"echo: <the last content string>\", unless the body has\n"
          "response_format {\"type\":\"json_schema\",\"json_schema\":{\"schema\":S,...}} or\n"
          "{\"type\":\"json_object\",\"schema\":S}: then the message content is a JSON object shaped\n"
          "by S (as a JSON string); {\"type\":\"json_object\"} alone gets {\"answer\":<string value>}.\n"
          "  document   the last user message's text (a string content, or its first text part),\n"
          "             JSON-unescaped to UTF-8 (\\uXXXX pairs joined, lone surrogates kept as\n"
          "             3 bytes). Lines 'Document <k>:' (k = 1-9 digits) open numbered sections,\n"
          "             each running to the next such line or the end; else the text after a\n"
          "             line 'Document:'; else the whole message. Section and 'Document:' texts\n"
          "             lose trailing spaces, tabs, CRs and LFs; the whole message is kept as is.\n"
          "  batch      with sections, an object S whose first array-of-objects property is answered\n"
          "             with one item per section, in order; an integer \"id\" of an item is the\n"
          "             section's k, its other values come from the section's text. Everything\n"
          "             else (other properties; any S when there are no sections) is filled once\n"
          "             from the first section / the document.\n"
          "  values     string: \"NAME:HHHHHHHH\", NAME the property's name (an array's items use the\n"
          "             array's name; \"answer\" at the top), H the 32-bit FNV-1a of the text's\n"
          "             UTF-8 bytes in lowercase hex; integer: the text's byte length; number:\n"
          "             that as N.0; boolean: true; null: null; enum: its first value; const: it;\n"
          "             object: every property in order (required or not); array: [one item].\n"
          "             A type list takes its first non-null type; $ref #, #/$defs/X and\n"
          "             #/definitions/X are followed, anyOf/oneOf/allOf take their first\n"
          "             non-null alternative; no type at all is a string.\n"
          "  otherwise  an unsupported or malformed schema, depth over 32, or an answer over 1 MiB\n"
          "             gets the echo. Usage: prompt_tokens = body bytes/4 + 1 as always;\n"
          "             completion_tokens = the escaped answer's bytes/4 + 1.\n",
          f);
}

static double parse_num(const char *opt, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "mockserver: bad value for --%s: %s (want %g..%g)\n", opt, s, lo, hi);
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv) {
    enum { OPT_HOST = 1, OPT_PORT, OPT_THREADS, OPT_LAT, OPT_JIT, OPT_RPM, OPT_TPM, OPT_FAIL, OPT_DROP,
           OPT_TRUNC, OPT_STALL, OPT_STALL_T, OPT_SEED, OPT_STDIN, OPT_EMBED_DIM, OPT_HELP,
           OPT_BARE_RATE, OPT_BARE_BURST, OPT_BARE_HALVE, OPT_BARE_RESTORE, OPT_BATCH_S,
           OPT_BATCH_ERR, OPT_BATCH_TRANS, OPT_BATCH_EXP, OPT_BATCH_FAIL, OPT_BATCH_MAX, OPT_TPM_USAGE,
           OPT_EMBED_TPM };
    static const struct option opts[] = {
        {"host", required_argument, 0, OPT_HOST},
        {"port", required_argument, 0, OPT_PORT},
        {"threads", required_argument, 0, OPT_THREADS},
        {"latency-ms", required_argument, 0, OPT_LAT},
        {"jitter-ms", required_argument, 0, OPT_JIT},
        {"rpm", required_argument, 0, OPT_RPM},
        {"tpm", required_argument, 0, OPT_TPM},
        {"fail-rate", required_argument, 0, OPT_FAIL},
        {"drop-rate", required_argument, 0, OPT_DROP},
        {"truncate-rate", required_argument, 0, OPT_TRUNC},
        {"stall-rate", required_argument, 0, OPT_STALL},
        {"stall-timeout-ms", required_argument, 0, OPT_STALL_T},
        {"seed", required_argument, 0, OPT_SEED},
        {"stdin-watch", no_argument, 0, OPT_STDIN},
        {"embed-dim", required_argument, 0, OPT_EMBED_DIM},
        {"help", no_argument, 0, OPT_HELP},
        {"bare-rate", required_argument, 0, OPT_BARE_RATE},
        {"bare-burst", required_argument, 0, OPT_BARE_BURST},
        {"bare-halve-at", required_argument, 0, OPT_BARE_HALVE},
        {"bare-restore-at", required_argument, 0, OPT_BARE_RESTORE},
        {"batch-seconds", required_argument, 0, OPT_BATCH_S},
        {"batch-error-every", required_argument, 0, OPT_BATCH_ERR},
        {"batch-transient-every", required_argument, 0, OPT_BATCH_TRANS},
        {"batch-expire-at", required_argument, 0, OPT_BATCH_EXP},
        {"batch-fail", no_argument, 0, OPT_BATCH_FAIL},
        {"batch-max-requests", required_argument, 0, OPT_BATCH_MAX},
        {"tpm-usage", no_argument, 0, OPT_TPM_USAGE},
        {"embed-tpm", required_argument, 0, OPT_EMBED_TPM},
        {0, 0, 0, 0},
    };
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case OPT_HOST: {
            const char *h = strcmp(optarg, "localhost") == 0 ? "127.0.0.1" : optarg;
            struct in_addr a;
            if (strlen(h) >= sizeof cfg.host || inet_pton(AF_INET, h, &a) != 1 ||
                (ntohl(a.s_addr) >> 24) != 127) {
                fprintf(stderr, "mockserver: --host must be a 127.x.x.x address\n");
                exit(2);
            }
            snprintf(cfg.host, sizeof cfg.host, "%s", h);
            break;
        }
        case OPT_PORT: cfg.port = (int)parse_num("port", optarg, 0, 65535); break;
        case OPT_THREADS: cfg.threads = (int)parse_num("threads", optarg, 1, 256); break;
        case OPT_LAT: cfg.latency_ms = parse_num("latency-ms", optarg, 0, 3.6e6); break;
        case OPT_JIT: cfg.jitter_ms = parse_num("jitter-ms", optarg, 0, 3.6e6); break;
        case OPT_RPM: cfg.rpm = parse_num("rpm", optarg, 0, 1e12); break;
        case OPT_TPM: cfg.tpm = parse_num("tpm", optarg, 0, 1e15); break;
        case OPT_TPM_USAGE: cfg.tpm_usage = 1; break;
        case OPT_EMBED_TPM: cfg.embed_tpm = parse_num("embed-tpm", optarg, 0, 1e15); break;
        case OPT_FAIL: cfg.fail_rate = parse_num("fail-rate", optarg, 0, 1); break;
        case OPT_DROP: cfg.drop_rate = parse_num("drop-rate", optarg, 0, 1); break;
        case OPT_TRUNC: cfg.truncate_rate = parse_num("truncate-rate", optarg, 0, 1); break;
        case OPT_STALL: cfg.stall_rate = parse_num("stall-rate", optarg, 0, 1); break;
        case OPT_STALL_T: cfg.stall_timeout_ms = parse_num("stall-timeout-ms", optarg, 0, 3.6e6); break;
        case OPT_SEED: cfg.seed = (uint64_t)strtoull(optarg, NULL, 0); break;
        case OPT_STDIN: cfg.stdin_watch = 1; break;
        case OPT_EMBED_DIM: cfg.embed_dim = (int)parse_num("embed-dim", optarg, 1, MAX_EMBED_DIM); break;
        case OPT_HELP: usage(stdout); exit(0);
        case OPT_BARE_RATE: cfg.bare_rate = parse_num("bare-rate", optarg, 0, 1e9); break;
        case OPT_BARE_BURST: cfg.bare_burst = parse_num("bare-burst", optarg, 1, 1e9); break;
        case OPT_BARE_HALVE: cfg.bare_halve_at = parse_num("bare-halve-at", optarg, 0, 1e6); break;
        case OPT_BARE_RESTORE:
            cfg.bare_restore_at = parse_num("bare-restore-at", optarg, 0, 1e6);
            break;
        case OPT_BATCH_S: cfg.batch_seconds = parse_num("batch-seconds", optarg, 0, 1e6); break;
        case OPT_BATCH_ERR:
            cfg.batch_error_every = (int)parse_num("batch-error-every", optarg, 0, 1e9);
            break;
        case OPT_BATCH_TRANS:
            cfg.batch_transient_every = (int)parse_num("batch-transient-every", optarg, 0, 1e9);
            break;
        case OPT_BATCH_EXP: cfg.batch_expire_at = parse_num("batch-expire-at", optarg, 0, 1); break;
        case OPT_BATCH_FAIL: cfg.batch_fail = 1; break;
        case OPT_BATCH_MAX:
            cfg.batch_max_requests = (int)parse_num("batch-max-requests", optarg, 0, 1e9);
            break;
        default: usage(stderr); exit(2);
        }
    }
    if (optind < argc) {
        usage(stderr);
        exit(2);
    }
    if (cfg.fail_rate + cfg.drop_rate + cfg.truncate_rate + cfg.stall_rate > 1.0 + 1e-9) {
        fprintf(stderr, "mockserver: fault rates add up to more than 1\n");
        exit(2);
    }
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < NOFILE_WANT) {
        /* a privileged process may lift the hard limit a little; fine if not */
        struct rlimit more = {NOFILE_WANT, NOFILE_WANT};
        if (setrlimit(RLIMIT_NOFILE, &more) == 0) return;
    }
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

static int make_listener(const struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("mockserver: socket");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (cfg.threads > 1) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) != 0) {
        perror("mockserver: bind");
        exit(1);
    }
    if (listen(fd, 65535) != 0) {
        perror("mockserver: listen");
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    /* keep 0/1/2 occupied so a socket never lands on them */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY) < 0)
            return 1;
    parse_args(argc, argv);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, SIG_DFL); /* a shell may start background jobs with SIGINT ignored */
    signal(SIGTERM, SIG_DFL);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* inherited by the workers */
    int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (sfd < 0) {
        perror("mockserver: signalfd");
        return 1;
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)cfg.port)};
    inet_pton(AF_INET, cfg.host, &addr.sin_addr);

    g_created = (uint64_t)time(NULL);
    uint64_t t0 = now_ns();
    limits_init(t0);

    worker_t *ws = calloc((size_t)cfg.threads, sizeof *ws);
    if (!ws) die_oom();
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *w = &ws[i];
        w->idx = i;
        w->lfd = make_listener(&addr);
        if (i == 0 && cfg.port == 0) { /* the others join the port the first one got */
            socklen_t al = sizeof addr;
            getsockname(w->lfd, (struct sockaddr *)&addr, &al);
        }
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        w->scratch = malloc(SCRATCH_SIZE);
        if (w->epfd < 0 || w->evfd < 0 || !w->scratch) {
            perror("mockserver: setup");
            return 1;
        }
        struct epoll_event le = {.events = EPOLLIN | EPOLLET, .data.ptr = &TAG_LISTEN};
        struct epoll_event se = {.events = EPOLLIN, .data.ptr = &TAG_STOP};
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->lfd, &le);
        epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->evfd, &se);
        rng_seed(&w->rng_fault, cfg.seed + 0x1000u * (uint64_t)i);
        rng_seed(&w->rng_jitter, ~cfg.seed + 0x1000u * (uint64_t)i);
    }
    printf("PORT %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    for (int i = 0; i < cfg.threads; i++) {
        if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0) {
            perror("mockserver: pthread_create");
            return 1;
        }
    }

    /* main thread: wait for a signal or stdin EOF */
    struct pollfd pf[2] = {{.fd = sfd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        int n = poll(pf, cfg.stdin_watch ? 2 : 1, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pf[0].revents) break;
        if (cfg.stdin_watch && pf[1].revents) {
            char b[4096];
            ssize_t r = read(0, b, sizeof b);
            if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) break;
            if (pf[1].revents & (POLLNVAL | POLLERR)) break;
        }
    }

    uint64_t one = 1;
    for (int i = 0; i < cfg.threads; i++)
        if (write(ws[i].evfd, &one, sizeof one) < 0) perror("mockserver: eventfd");
    for (int i = 0; i < cfg.threads; i++) {
        worker_t *w = &ws[i];
        pthread_join(w->th, NULL);
        close(w->lfd);
        close(w->epfd);
        close(w->evfd);
        if (w->reserve_fd >= 0) close(w->reserve_fd);
        free(w->scratch);
        free(w->heap);
        buf_free(&w->body);
        buf_free(&w->hdrs);
        buf_free(&w->doc);
        buf_free(&w->ans);
        buf_free(&w->text);
    }
    free(ws);
    close(sfd);
    return 0;
}
