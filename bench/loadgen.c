/*
 * loadgen.c - the benchmark's uwsgi load generator (127.0.0.1 only).
 *
 * Theory of operation
 * -------------------
 * rps mode (-c C -d D): a closed loop of C slots on one epoll set.  A slot
 * connects (non-blocking), sends one small uwsgi request (HTTP_HOST among the
 * vars), reads the response to EOF, checks the status line and Content-Length,
 * closes and starts again.  Latency runs from connect() to EOF and goes into a
 * histogram with 1 us steps up to 100 ms and 1 ms steps above, so memory is
 * fixed however long the run.  After an unmeasured warm-up (-w) the line
 * "START" is printed, after D seconds "END"; only requests that finish in
 * between are counted.  Then nothing new is started and the requests in
 * flight get up to 2 s to finish (not counted), and one RESULT line follows.
 * It includes errors by kind (refused/failed connect, reset or other read
 * error, empty response, timeout, bad status, short body) and max_gap_us, the
 * longest stretch of the window in which no request completed successfully
 * (window start to the first completion and the last one to window end count).
 *
 * upload / download modes (-u N / -g N, -n COUNT): COUNT sequential transfers
 * on blocking sockets, one connection each; upload sends CONTENT_LENGTH=N and
 * N body bytes, download asks for PATH_INFO=/bytes/N and checks it got N body
 * bytes.  Prints one XFER line per transfer and a RESULT with the MiB/s over
 * all of them.
 *
 * idle mode (-i N): opens N connections (at most 128 connects in flight),
 * sends each only a 4-byte uwsgi header announcing vars that never come, and
 * holds them until stdin reaches EOF, SIGINT/SIGTERM arrives or -d seconds
 * pass.  Prints "HOLDING open=..." once every connect has been tried, then a
 * RESULT with how many were still open and how many the peer closed.
 *
 * Everything is bounded: per-request timeout (-t), drain limit, a connect
 * deadline in idle mode, socket timeouts in the transfer modes, and an
 * alarm() that ends the process if a run overstays its budget by 30 s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 4096
#define MAX_IDLE 100000
#define HEAD_KEEP 256
#define FINE_BUCKETS 100000   /* 1 us each: 0 .. 99.999 ms */
#define COARSE_BUCKETS 120000 /* 1 ms each: 100 ms .. 120 s */
#define XFER_BUF (1024 * 1024)
#define DRAIN_US 2000000ULL

enum { SL_IDLE, SL_CONNECTING, SL_SENDING, SL_READING, SL_WAIT_RETRY };

struct slot {
    int fd;
    int state;
    uint64_t t0;        /* connect() time, us */
    uint64_t retry_at;  /* SL_WAIT_RETRY: when to start again */
    size_t sent;
    uint64_t got;
    int head_len;
    char head[HEAD_KEEP];
};

static struct sockaddr_in target;
static char request[1024];
static size_t request_len;
static char rbuf[65536];
static uint32_t hist_fine[FINE_BUCKETS];
static uint32_t hist_coarse[COARSE_BUCKETS];
static uint64_t hist_over;
static volatile sig_atomic_t stop_flag;

/* counters for the measured window */
static int measuring;
static uint64_t n_ok, n_slow, e_connect, e_io, e_status, e_short, e_empty, e_timeout, lat_max;
static uint64_t last_ok_us, max_gap_us; /* completions in the window: longest stretch without one */

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static void on_alarm(int sig)
{
    static const char msg[] = "loadgen: time budget exceeded, exiting\n";
    (void)sig;
    if (write(2, msg, sizeof(msg) - 1) < 0) { /* nothing to do */ }
    _exit(3);
}

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void put_var(char **p, const char *k, const char *v)
{
    size_t kl = strlen(k), vl = strlen(v);
    *(*p)++ = (char)(kl & 0xff);
    *(*p)++ = (char)(kl >> 8);
    memcpy(*p, k, kl);
    *p += kl;
    *(*p)++ = (char)(vl & 0xff);
    *(*p)++ = (char)(vl >> 8);
    memcpy(*p, v, vl);
    *p += vl;
}

/* Build the uwsgi request into `request`. */
static void build_request(const char *host, const char *method, const char *path, const char *content_length)
{
    char *p = request + 4;
    size_t ds;
    put_var(&p, "REQUEST_METHOD", method);
    put_var(&p, "REQUEST_URI", path);
    put_var(&p, "PATH_INFO", path);
    put_var(&p, "QUERY_STRING", "");
    put_var(&p, "SERVER_PROTOCOL", "HTTP/1.1");
    put_var(&p, "SERVER_NAME", host);
    put_var(&p, "SERVER_PORT", "80");
    put_var(&p, "REMOTE_ADDR", "127.0.0.1");
    put_var(&p, "HTTP_HOST", host);
    if (content_length)
        put_var(&p, "CONTENT_LENGTH", content_length);
    ds = (size_t)(p - request) - 4;
    request[0] = 0;
    request[1] = (char)(ds & 0xff);
    request[2] = (char)(ds >> 8);
    request[3] = 0;
    request_len = ds + 4;
}

/* 0 = ok, 1 = bad status, 2 = short body.  `head` holds the first bytes. */
static int check_response(const char *head, int head_len, uint64_t total, uint64_t expect_body)
{
    const char *end, *cl;
    uint64_t hdr, want;
    char tmp[HEAD_KEEP + 1];
    if (head_len < 12 || memcmp(head, "HTTP/1.", 7) != 0 || memcmp(head + 9, "200", 3) != 0)
        return 1;
    memcpy(tmp, head, (size_t)head_len);
    tmp[head_len] = 0;
    end = strstr(tmp, "\r\n\r\n");
    if (!end)
        return 0; /* head longer than we keep: cannot check the length */
    hdr = (uint64_t)(end - tmp) + 4;
    cl = strcasestr(tmp, "\r\ncontent-length:");
    if (cl && cl < end)
        want = strtoull(cl + 17, NULL, 10);
    else
        want = expect_body;
    if (want != UINT64_MAX && total - hdr < want)
        return 2;
    return 0;
}

static void hist_add(uint64_t us)
{
    if (us < FINE_BUCKETS)
        hist_fine[us]++;
    else if ((us - FINE_BUCKETS) / 1000 < COARSE_BUCKETS)
        hist_coarse[(us - FINE_BUCKETS) / 1000]++;
    else
        hist_over++;
    if (us > lat_max)
        lat_max = us;
}

static uint64_t hist_pct(uint64_t total, double pct)
{
    uint64_t rank, seen = 0;
    size_t i;
    if (total == 0)
        return 0;
    rank = (uint64_t)(pct / 100.0 * (double)total + 0.999999);
    if (rank < 1)
        rank = 1;
    for (i = 0; i < FINE_BUCKETS; i++) {
        seen += hist_fine[i];
        if (seen >= rank)
            return i;
    }
    for (i = 0; i < COARSE_BUCKETS; i++) {
        seen += hist_coarse[i];
        if (seen >= rank)
            return FINE_BUCKETS + i * 1000;
    }
    return lat_max;
}

/* ---------------------------------------------------------------- rps mode */

static int epfd;
static struct slot *slots;
static int conc;
static int starting = 1;      /* start new requests? */
static uint64_t timeout_us = 10000000ULL;

static void slot_close(struct slot *s)
{
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    s->state = SL_IDLE;
}

static void count_error(uint64_t *counter)
{
    if (measuring)
        (*counter)++;
}

static void slot_fail(struct slot *s, uint64_t *counter, int retry_later)
{
    count_error(counter);
    slot_close(s);
    if (retry_later) {
        s->state = SL_WAIT_RETRY;
        s->retry_at = now_us() + 1000; /* 1 ms: no busy loop against a closed port */
    }
}

static int slot_arm(struct slot *s, uint32_t events, int op)
{
    struct epoll_event ev;
    ev.events = events;
    ev.data.u32 = (uint32_t)(s - slots);
    return epoll_ctl(epfd, op, s->fd, &ev);
}

static void slot_send(struct slot *s, int registered)
{
    while (s->sent < request_len) {
        ssize_t w = write(s->fd, request + s->sent, request_len - s->sent);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                s->state = SL_SENDING;
                if (slot_arm(s, EPOLLOUT, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD) < 0)
                    slot_fail(s, &e_io, 0);
                return;
            }
            slot_fail(s, &e_io, 0);
            return;
        }
        s->sent += (size_t)w;
    }
    s->state = SL_READING;
    if (slot_arm(s, EPOLLIN, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD) < 0)
        slot_fail(s, &e_io, 0);
}

static void slot_start(struct slot *s)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    s->sent = 0;
    s->got = 0;
    s->head_len = 0;
    s->t0 = now_us();
    if (fd < 0) {
        s->fd = -1;
        slot_fail(s, &e_connect, 1);
        return;
    }
    s->fd = fd;
    if (connect(fd, (struct sockaddr *)&target, sizeof(target)) == 0) {
        slot_send(s, 0);
    } else if (errno == EINPROGRESS) {
        s->state = SL_CONNECTING;
        if (slot_arm(s, EPOLLOUT, EPOLL_CTL_ADD) < 0)
            slot_fail(s, &e_io, 0);
    } else {
        slot_fail(s, &e_connect, 1);
    }
}

static void slot_done(struct slot *s)
{
    uint64_t t = now_us();
    int bad = check_response(s->head, s->head_len, s->got, UINT64_MAX);
    if (s->got == 0)
        count_error(&e_empty);
    else if (bad == 1)
        count_error(&e_status);
    else if (bad == 2)
        count_error(&e_short);
    else if (measuring) {
        uint64_t lat = t - s->t0;
        if (t - last_ok_us > max_gap_us)
            max_gap_us = t - last_ok_us;
        last_ok_us = t;
        n_ok++;
        hist_add(lat);
        if (lat >= 1000000ULL)
            n_slow++;
    }
    slot_close(s);
}

static void slot_event(struct slot *s, uint32_t events)
{
    if (s->state == SL_CONNECTING) {
        int err = 0;
        socklen_t l = sizeof(err);
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            slot_fail(s, &e_connect, 1);
            return;
        }
        slot_send(s, 1);
        return;
    }
    if (s->state == SL_SENDING) {
        if (events & EPOLLERR) {
            slot_fail(s, &e_io, 0);
            return;
        }
        slot_send(s, 1);
        return;
    }
    if (s->state != SL_READING)
        return;
    for (;;) {
        ssize_t r = read(s->fd, rbuf, sizeof(rbuf));
        if (r > 0) {
            if (s->head_len < HEAD_KEEP) {
                int take = (int)r < HEAD_KEEP - s->head_len ? (int)r : HEAD_KEEP - s->head_len;
                memcpy(s->head + s->head_len, rbuf, (size_t)take);
                s->head_len += take;
            }
            s->got += (uint64_t)r;
            if ((size_t)r < sizeof(rbuf))
                continue; /* most likely EOF is next: read it now */
            return;       /* level-triggered: come back for the rest */
        }
        if (r == 0) {
            slot_done(s);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            return;
        slot_fail(s, &e_io, 0);
        return;
    }
}

static void mark_start(double *cpu0)
{
    measuring = 1;
    last_ok_us = now_us();
    *cpu0 = cpu_seconds();
    printf("START\n");
    fflush(stdout);
}

static int run_rps(double warm_s, double dur_s)
{
    struct epoll_event events[512];
    uint64_t t_begin, t_start, t_end, t_stop, last_scan;
    double cpu0 = 0, cpu1 = 0;
    int i, inflight = 0;

    epfd = epoll_create1(EPOLL_CLOEXEC);
    slots = calloc((size_t)conc, sizeof(*slots));
    if (!slots || epfd < 0) {
        perror("setup");
        return 1;
    }
    for (i = 0; i < conc; i++)
        slots[i].fd = -1;

    t_begin = now_us();
    t_start = t_begin + (uint64_t)(warm_s * 1e6);
    t_end = t_start + (uint64_t)(dur_s * 1e6);
    t_stop = t_end + DRAIN_US;
    last_scan = t_begin;
    if (warm_s <= 0)
        mark_start(&cpu0);
    for (i = 0; i < conc; i++)
        slot_start(&slots[i]);

    for (;;) {
        uint64_t t = now_us();
        int n, waiting = 0;
        if (starting && !measuring && t >= t_start)
            mark_start(&cpu0);
        if (starting && (t >= t_end || stop_flag)) {
            measuring = 0;
            starting = 0;
            cpu1 = cpu_seconds();
            if (t < t_end)
                t_end = t;
            if (t - last_ok_us > max_gap_us)
                max_gap_us = t - last_ok_us;
            t_stop = t + DRAIN_US;
            printf("END\n");
            fflush(stdout);
        }
        /* slots that wait for a retry, or were stopped, and the drain check */
        inflight = 0;
        for (i = 0; i < conc; i++) {
            struct slot *s = &slots[i];
            if (s->state == SL_WAIT_RETRY) {
                if (!starting)
                    s->state = SL_IDLE;
                else if (t >= s->retry_at)
                    slot_start(s);
            }
            if (s->state == SL_WAIT_RETRY)
                waiting = 1;
            else if (s->state != SL_IDLE)
                inflight++;
        }
        if (!starting && (inflight == 0 || t >= t_stop))
            break;
        if (t - last_scan >= 100000) {
            last_scan = t;
            for (i = 0; i < conc; i++) {
                struct slot *s = &slots[i];
                /* t0 may be later than t (slot restarted in this pass): compare, do not subtract */
                if (s->state != SL_IDLE && s->state != SL_WAIT_RETRY && t > s->t0 + timeout_us)
                    slot_fail(s, &e_timeout, starting);
            }
        }
        n = epoll_wait(epfd, events, 512, waiting ? 1 : 20);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (i = 0; i < n; i++) {
            struct slot *s = &slots[events[i].data.u32];
            slot_event(s, events[i].events);
            if (starting && s->state == SL_IDLE)
                slot_start(s);
        }
    }
    for (i = 0; i < conc; i++)
        slot_close(&slots[i]);
    {
        double secs = (double)(t_end - t_start) / 1e6;
        uint64_t errors = e_connect + e_io + e_status + e_short + e_empty + e_timeout;
        if (secs <= 0)
            secs = 1e-9;
        printf("RESULT mode=rps conc=%d secs=%.3f requests=%llu rps=%.1f errors=%llu "
               "err_connect=%llu err_io=%llu err_status=%llu err_short=%llu err_empty=%llu "
               "err_timeout=%llu slow_1s=%llu p50_us=%llu p90_us=%llu p99_us=%llu max_us=%llu "
               "max_gap_us=%llu inflight_left=%d cpu_s=%.3f\n",
               conc, secs, (unsigned long long)n_ok, (double)n_ok / secs, (unsigned long long)errors,
               (unsigned long long)e_connect, (unsigned long long)e_io, (unsigned long long)e_status,
               (unsigned long long)e_short, (unsigned long long)e_empty, (unsigned long long)e_timeout,
               (unsigned long long)n_slow, (unsigned long long)hist_pct(n_ok, 50),
               (unsigned long long)hist_pct(n_ok, 90), (unsigned long long)hist_pct(n_ok, 99),
               (unsigned long long)lat_max, (unsigned long long)max_gap_us, inflight, cpu1 - cpu0);
    }
    return 0;
}

/* ----------------------------------------------------------- transfer modes */

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int empty_cl;            /* -z: send an empty CONTENT_LENGTH on GETs */

static int run_transfer(int upload, uint64_t nbytes, int count)
{
    static char buf[XFER_BUF];
    char num[32], path[64];
    struct timeval tv = {10, 0};
    uint64_t total_body = 0, t_all0, t_all;
    int i, errors = 0;

    memset(buf, 'u', sizeof(buf));
    snprintf(num, sizeof(num), "%llu", (unsigned long long)nbytes);
    if (upload)
        build_request("localhost", "POST", "/upload", num);
    else {
        snprintf(path, sizeof(path), "/bytes/%llu", (unsigned long long)nbytes);
        build_request("localhost", "GET", path, empty_cl ? "" : NULL);
    }
    t_all0 = now_us();
    for (i = 0; i < count && !stop_flag; i++) {
        uint64_t t0 = now_us(), got = 0, left;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), head_len = 0, bad;
        char head[HEAD_KEEP];
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0 ||
            connect(fd, (struct sockaddr *)&target, sizeof(target)) < 0 ||
            write_all(fd, request, request_len) < 0) {
            perror("transfer connect/send");
            errors++;
            if (fd >= 0)
                close(fd);
            continue;
        }
        left = upload ? nbytes : 0;
        while (left) {
            size_t chunk = left < XFER_BUF ? (size_t)left : XFER_BUF;
            if (write_all(fd, buf, chunk) < 0)
                break;
            left -= chunk;
        }
        if (left) {
            perror("transfer body");
            errors++;
            close(fd);
            continue;
        }
        for (;;) {
            ssize_t r = read(fd, buf, sizeof(buf));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                if (r < 0) {
                    perror("transfer read");
                    got = 0;
                }
                break;
            }
            if (head_len < HEAD_KEEP) {
                int take = (int)r < HEAD_KEEP - head_len ? (int)r : HEAD_KEEP - head_len;
                memcpy(head + head_len, buf, (size_t)take);
                head_len += take;
            }
            got += (uint64_t)r;
        }
        close(fd);
        bad = got ? check_response(head, head_len, got, upload ? UINT64_MAX : nbytes) : 1;
        if (bad) {
            fprintf(stderr, "transfer %d: bad response (got %llu bytes)\n", i, (unsigned long long)got);
            errors++;
            continue;
        }
        total_body += nbytes;
        {
            double secs = (double)(now_us() - t0) / 1e6;
            printf("XFER %d secs=%.6f mibps=%.1f\n", i, secs, (double)nbytes / 1048576.0 / secs);
        }
    }
    t_all = now_us() - t_all0;
    printf("RESULT mode=%s bytes=%llu count=%d ok=%d errors=%d secs=%.6f mibps=%.1f cpu_s=%.3f\n",
           upload ? "upload" : "download", (unsigned long long)nbytes, count, count - errors, errors,
           (double)t_all / 1e6, errors ? 0.0 : (double)total_body / 1048576.0 / ((double)t_all / 1e6),
           cpu_seconds());
    return errors ? 1 : 0;
}

/* ---------------------------------------------------------------- idle mode */

enum { IC_NONE, IC_CONNECTING, IC_OPEN, IC_GONE };

static int run_idle(int nconn, double max_s)
{
    static const unsigned char hdr[4] = {0, 200, 0, 0}; /* datasize 200, never sent */
    struct epoll_event ev, events[512];
    int *fds, i, next = 0, pending = 0, open_n = 0, failed = 0, closed_by_peer = 0, announced = 0;
    unsigned char *st;
    uint64_t t0 = now_us(), connect_deadline = t0 + 30000000ULL;
    uint64_t hold_deadline = t0 + (uint64_t)(max_s * 1e6);

    fds = malloc(sizeof(int) * (size_t)nconn);
    st = calloc((size_t)nconn, 1);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!fds || !st || epfd < 0) {
        perror("setup");
        return 1;
    }
    for (i = 0; i < nconn; i++)
        fds[i] = -1;
    ev.events = EPOLLIN;
    ev.data.u32 = UINT32_MAX;
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev); /* fails for a regular file: then signals/-d only */

    while (!stop_flag) {
        uint64_t t = now_us();
        int n;
        while (next < nconn && pending < 128 && t < connect_deadline) {
            int idx = next++;
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                failed++;
                st[idx] = IC_GONE;
                continue;
            }
            if (connect(fd, (struct sockaddr *)&target, sizeof(target)) == 0 || errno == EINPROGRESS) {
                fds[idx] = fd;
                st[idx] = IC_CONNECTING;
                ev.events = EPOLLOUT;
                ev.data.u32 = (uint32_t)idx;
                epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
                pending++;
            } else {
                close(fd);
                st[idx] = IC_GONE;
                failed++;
            }
        }
        if (!announced && ((next >= nconn && pending == 0) || t >= connect_deadline)) {
            for (i = 0; i < nconn; i++) {
                if (st[i] == IC_CONNECTING) { /* still not connected at the deadline */
                    close(fds[i]);
                    fds[i] = -1;
                    st[i] = IC_GONE;
                    failed++;
                } else if (st[i] == IC_NONE) {
                    st[i] = IC_GONE;
                    failed++;
                }
            }
            pending = 0;
            next = nconn;
            announced = 1;
            printf("HOLDING open=%d failed=%d secs=%.3f\n", open_n, failed, (double)(t - t0) / 1e6);
            fflush(stdout);
        }
        if (t >= hold_deadline)
            break;
        n = epoll_wait(epfd, events, 512, 100);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            break;
        }
        for (i = 0; i < n; i++) {
            uint32_t idx = events[i].data.u32;
            int fd;
            if (idx == UINT32_MAX) {
                char b[256];
                if (read(0, b, sizeof(b)) <= 0)
                    stop_flag = 1;
                continue;
            }
            fd = fds[idx];
            if (st[idx] == IC_CONNECTING) {
                int err = 0;
                socklen_t l = sizeof(err);
                pending--;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || write(fd, hdr, sizeof(hdr)) != (ssize_t)sizeof(hdr)) {
                    close(fd);
                    fds[idx] = -1;
                    st[idx] = IC_GONE;
                    failed++;
                    continue;
                }
                st[idx] = IC_OPEN;
                open_n++;
                ev.events = EPOLLIN | EPOLLRDHUP;
                ev.data.u32 = idx;
                epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
            } else if (st[idx] == IC_OPEN) {
                /* the peer answered or closed: either way the connection is no longer held */
                close(fd);
                fds[idx] = -1;
                st[idx] = IC_GONE;
                open_n--;
                closed_by_peer++;
            }
        }
    }
    printf("RESULT mode=idle requested=%d open=%d failed=%d closed_by_peer=%d secs=%.3f\n", nconn, open_n,
           failed, closed_by_peer, (double)(now_us() - t0) / 1e6);
    fflush(stdout);
    for (i = 0; i < nconn; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
    free(st);
    return 0;
}

/* ---------------------------------------------------------------------- main */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen -p PORT MODE [options]   (connects to 127.0.0.1:PORT only)\n"
            "  rps:      -c CONC -d SECS [-w WARMUP_S] [-t TIMEOUT_MS] [-k HOST] [-z] [-r BYTES]\n"
            "            (-r: ask for a BYTES-byte response body, PATH_INFO=/bytes/BYTES)\n"
            "            (-z: send an empty CONTENT_LENGTH, as nginx does for a GET)\n"
            "  upload:   -u BYTES [-n COUNT]\n"
            "  download: -g BYTES [-n COUNT] [-z]\n"
            "  idle:     -i CONNS [-d MAX_HOLD_S]  (hold until stdin EOF, SIGINT/SIGTERM or MAX_HOLD_S)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = -1, opt, count = 1, idle = 0, rc;
    double dur = -1, warm = 0;
    long long up = -1, down = -1, resp = -1;
    char rps_path[64] = "/";
    const char *host = "localhost";
    struct sigaction act;
    struct rlimit rl;
    unsigned budget;

    while ((opt = getopt(argc, argv, "p:c:d:w:t:k:u:g:n:i:r:zh")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'w': warm = atof(optarg); break;
        case 't': timeout_us = (uint64_t)atoll(optarg) * 1000ULL; break;
        case 'k': host = optarg; break;
        case 'u': up = atoll(optarg); break;
        case 'g': down = atoll(optarg); break;
        case 'n': count = atoi(optarg); break;
        case 'i': idle = atoi(optarg); break;
        case 'z': empty_cl = 1; break;
        case 'r': resp = atoll(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || strlen(host) > 200 || count < 1 || count > 1000 || warm < 0 ||
        warm > 600 || dur > 3600)
        usage();

    memset(&target, 0, sizeof(target));
    target.sin_family = AF_INET;
    target.sin_port = htons((uint16_t)port);
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    memset(&act, 0, sizeof(act));
    act.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &act, NULL);
    act.sa_handler = on_signal;
    sigaction(SIGINT, &act, NULL);
    sigaction(SIGTERM, &act, NULL);
    act.sa_handler = on_alarm;
    sigaction(SIGALRM, &act, NULL);

    if (idle > 0) {
        if (idle > MAX_IDLE)
            usage();
        if (dur <= 0)
            dur = 120;
        alarm((unsigned)dur + 60);
        return run_idle(idle, dur);
    }
    if (up >= 0 || down >= 0) {
        if ((up >= 0) == (down >= 0) || (up >= 0 ? up : down) > (1LL << 36))
            usage();
        budget = (unsigned)count * 20 + 30;
        alarm(budget);
        return run_transfer(up >= 0, (uint64_t)(up >= 0 ? up : down), count);
    }
    if (conc < 1 || conc > MAX_CONC || dur <= 0)
        usage();
    if (resp > (1LL << 36))
        usage();
    if (resp >= 0)
        snprintf(rps_path, sizeof(rps_path), "/bytes/%lld", resp);
    build_request(host, "GET", rps_path, empty_cl ? "" : NULL);
    budget = (unsigned)(warm + dur) + 30;
    alarm(budget);
    rc = run_rps(warm, dur);
    fflush(stdout);
    return rc;
}
