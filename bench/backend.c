/*
 * backend.c - the benchmark's uwsgi backend.
 *
 * Theory of operation
 * -------------------
 * One thread, one epoll set, level-triggered, TCP on 127.0.0.1 only.  Each
 * accepted connection goes through three states:
 *
 *   HEAD   read the 4-byte uwsgi header and the `datasize` bytes of vars
 *          (the buffer grows once if the vars do not fit the inline one);
 *   BODY   read CONTENT_LENGTH body bytes into a shared scratch buffer and
 *          forget them (bytes that came with the vars count as body);
 *   WRITE  send a small fixed HTTP/1.1 response, or for PATH_INFO=/bytes/N a
 *          response whose body is N bytes streamed from a static buffer;
 *
 * then the connection is closed.  A new connection is read at once (its
 * request is usually there already), so the common request costs accept,
 * read, write, close and no epoll_ctl at all.
 *
 * Nothing is printed per request.  The listening address is printed once
 * ("LISTEN 127.0.0.1:PORT") so that port 0 can be used; SIGINT or SIGTERM
 * print the counters on stderr and end the process; SIGUSR1 prints them on
 * stdout ("COUNTERS ...") and goes on.
 *
 * With -u PATH the backend listens on a UNIX socket instead.  With -F it also
 * takes client descriptors passed with SCM_RIGHTS: the head is read with
 * recvmsg() and room for one descriptor.  If one came with it, the response
 * (the small one, or /bytes/N streamed) goes to THAT descriptor, and the
 * router's connection is closed without a byte (the router reads EOF as
 * "taken").  Without a descriptor the request is answered as usual.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define INLINE_BUF 1024
#define SCRATCH_SIZE (256 * 1024)
#define MAX_EVENTS 256
#define MAX_STREAM ((uint64_t)1 << 40)

enum { ST_HEAD, ST_BODY, ST_WRITE };

struct conn {
    int fd;
    int state;
    uint32_t events;     /* current epoll interest, 0 = not registered */
    uint32_t have;       /* bytes in buf */
    uint32_t cap;        /* size of buf */
    uint32_t need;       /* 4 + datasize, 0 until the header is in */
    int passed_fd;       /* client descriptor that came with the head (-F), or -1 */
    uint64_t body_left;  /* request body bytes still to read */
    uint64_t stream_left;/* response body bytes still to write */
    const char *out;     /* response head still to write */
    size_t out_len;
    char *buf;
    char head[192];      /* response head for /bytes/N */
    char inline_buf[INLINE_BUF];
};

static const char small_response[] =
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 13\r\n"
    "Connection: close\r\n"
    "\r\n"
    "Hello, World!";

static char scratch[SCRATCH_SIZE];
static int epfd = -1;
static volatile sig_atomic_t stop_flag, report_flag;
static int take_fds;

static uint64_t n_requests, n_errors, n_accepted, body_bytes_in, bytes_out, n_fd_passed;

static void on_signal(int sig) { (void)sig; stop_flag = 1; }
static void on_report(int sig) { (void)sig; report_flag = 1; }

static void conn_close(struct conn *c, int error)
{
    if (error)
        n_errors++;
    if (c->passed_fd >= 0)
        close(c->passed_fd);
    close(c->fd);
    if (c->buf != c->inline_buf)
        free(c->buf);
    free(c);
}

static int set_interest(struct conn *c, uint32_t events)
{
    struct epoll_event ev;
    if (c->events == events)
        return 0;
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return -1;
    c->events = events;
    return 0;
}

static uint64_t parse_u64(const unsigned char *p, size_t n)
{
    uint64_t v = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        v = v * 10 + (uint64_t)(p[i] - '0');
        if (v > MAX_STREAM)
            return MAX_STREAM;
    }
    return v;
}

/* Walk the vars block; pick PATH_INFO=/bytes/N and CONTENT_LENGTH.  -1 if malformed. */
static int parse_vars(const unsigned char *p, size_t len, uint64_t *content_length, uint64_t *stream)
{
    size_t pos = 0;
    *content_length = 0;
    *stream = UINT64_MAX;
    while (pos < len) {
        size_t kl, vl;
        const unsigned char *k, *v;
        if (pos + 2 > len)
            return -1;
        kl = (size_t)p[pos] | ((size_t)p[pos + 1] << 8);
        pos += 2;
        if (kl == 0 || pos + kl + 2 > len)
            return -1;
        k = p + pos;
        pos += kl;
        vl = (size_t)p[pos] | ((size_t)p[pos + 1] << 8);
        pos += 2;
        if (pos + vl > len)
            return -1;
        v = p + pos;
        pos += vl;
        if (kl == 14 && memcmp(k, "CONTENT_LENGTH", 14) == 0)
            *content_length = parse_u64(v, vl);
        else if (kl == 9 && memcmp(k, "PATH_INFO", 9) == 0 && vl > 7 && memcmp(v, "/bytes/", 7) == 0)
            *stream = parse_u64(v + 7, vl - 7);
    }
    return 0;
}

/* Write what is pending.  1 = done, 0 = wait for EPOLLOUT, -1 = error. */
static int do_write(struct conn *c)
{
    for (;;) {
        struct iovec iov[2];
        int n = 0;
        ssize_t w;
        if (c->out_len) {
            iov[n].iov_base = (void *)c->out;
            iov[n].iov_len = c->out_len;
            n++;
        }
        if (c->stream_left) {
            iov[n].iov_base = scratch;
            iov[n].iov_len = c->stream_left < SCRATCH_SIZE ? (size_t)c->stream_left : SCRATCH_SIZE;
            n++;
        }
        if (n == 0)
            return 1;
        w = writev(c->fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        bytes_out += (uint64_t)w;
        if ((size_t)w <= c->out_len) {
            c->out += w;
            c->out_len -= (size_t)w;
        } else {
            w -= (ssize_t)c->out_len;
            c->out_len = 0;
            c->stream_left -= (uint64_t)w;
        }
    }
}

static void start_response(struct conn *c, uint64_t stream)
{
    if (stream == UINT64_MAX) {
        c->out = small_response;
        c->out_len = sizeof(small_response) - 1;
        c->stream_left = 0;
    } else {
        int n = snprintf(c->head, sizeof(c->head),
                         "HTTP/1.1 200 OK\r\n"
                         "Content-Type: application/octet-stream\r\n"
                         "Content-Length: %llu\r\n"
                         "Connection: close\r\n"
                         "\r\n",
                         (unsigned long long)stream);
        c->out = c->head;
        c->out_len = (size_t)n;
        c->stream_left = stream;
    }
    c->state = ST_WRITE;
}

static void step_write(struct conn *c)
{
    int r = do_write(c);
    if (r < 0) {
        conn_close(c, 1);
    } else if (r == 0) {
        if (set_interest(c, EPOLLOUT) < 0)
            conn_close(c, 1);
    } else {
        n_requests++;
        conn_close(c, 0);
    }
}

/* Read and discard the body; returns 1 when complete, 0 to wait, -1 on error. */
static int read_body(struct conn *c)
{
    int rounds = 0;
    while (c->body_left) {
        size_t want = c->body_left < SCRATCH_SIZE ? (size_t)c->body_left : SCRATCH_SIZE;
        ssize_t r = read(c->fd, scratch, want);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? 0 : -1;
        }
        if (r == 0)
            return -1;
        body_bytes_in += (uint64_t)r;
        c->body_left -= (uint64_t)r;
        if (++rounds >= 64 && c->body_left)
            return 0; /* let the others run; level-triggered brings us back */
    }
    return 1;
}

/* read() into the head buffer, keeping one descriptor passed with the bytes (-F). */
static ssize_t read_fd(struct conn *c)
{
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int))]; } ctl;
    struct iovec iov;
    struct msghdr msg;
    struct cmsghdr *cm;
    ssize_t r;
    iov.iov_base = c->buf + c->have;
    iov.iov_len = c->cap - c->have;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.space;
    msg.msg_controllen = sizeof(ctl.space);
    r = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0)
        return r;
    for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm), sizeof(int));
            if (c->passed_fd >= 0)
                close(fd); /* only one per request */
            else
                c->passed_fd = fd;
        }
    }
    if (msg.msg_flags & MSG_CTRUNC)
        n_errors++; /* more descriptors than room: the kernel closed them */
    return r;
}

/* Answer on the passed descriptor, close it, close the router's connection silently. */
static void answer_passed(struct conn *c)
{
    const char *p = small_response;
    size_t left = sizeof(small_response) - 1;
    int fd = c->passed_fd, spins = 0;
    c->passed_fd = -1;
    while (left) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR || (errno == EAGAIN && ++spins < 1000))
                continue;
            break;
        }
        p += w;
        left -= (size_t)w;
        bytes_out += (uint64_t)w;
    }
    close(fd);
    if (left) {
        conn_close(c, 1);
        return;
    }
    n_fd_passed++;
    n_requests++;
    conn_close(c, 0);
}

static void step_read(struct conn *c)
{
    if (c->state == ST_HEAD) {
        for (;;) {
            ssize_t r;
            if (c->have >= 4 && c->need == 0) {
                const unsigned char *b = (const unsigned char *)c->buf;
                c->need = 4 + ((uint32_t)b[1] | ((uint32_t)b[2] << 8));
                if (c->need > c->cap) {
                    char *nb = malloc(c->need);
                    if (!nb) {
                        conn_close(c, 1);
                        return;
                    }
                    memcpy(nb, c->buf, c->have);
                    c->buf = nb;
                    c->cap = c->need;
                }
            }
            if (c->need && c->have >= c->need)
                break;
            r = take_fds ? read_fd(c) : read(c->fd, c->buf + c->have, c->cap - c->have);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    if (set_interest(c, EPOLLIN) < 0)
                        conn_close(c, 1);
                    return;
                }
                conn_close(c, 1);
                return;
            }
            if (r == 0) {
                conn_close(c, 1);
                return;
            }
            c->have += (uint32_t)r;
        }
        {
            uint64_t cl, stream, extra;
            if (parse_vars((const unsigned char *)c->buf + 4, c->need - 4, &cl, &stream) < 0) {
                conn_close(c, 1);
                return;
            }
            extra = c->have - c->need;
            body_bytes_in += extra < cl ? extra : cl;
            c->body_left = cl > extra ? cl - extra : 0;
            /* remember what to answer; the head buffer is not needed any more */
            c->stream_left = stream;
            c->state = ST_BODY;
            if (c->passed_fd >= 0 && c->body_left == 0) {
                if (stream == UINT64_MAX) {
                    answer_passed(c);
                    return;
                }
                /* /bytes/N: stream it on the client's own socket */
                int fl = fcntl(c->passed_fd, F_GETFL);
                if (fl < 0 || fcntl(c->passed_fd, F_SETFL, fl | O_NONBLOCK) < 0) {
                    conn_close(c, 1);
                    return;
                }
                close(c->fd);    /* the router's connection: closed without a byte */
                c->fd = c->passed_fd;
                c->passed_fd = -1;
                c->events = 0;
                n_fd_passed++;
            }
        }
    }
    if (c->state == ST_BODY) {
        int r = read_body(c);
        if (r < 0) {
            conn_close(c, 1);
            return;
        }
        if (r == 0) {
            if (set_interest(c, EPOLLIN) < 0)
                conn_close(c, 1);
            return;
        }
        start_response(c, c->stream_left);
        step_write(c);
    }
}

static void accept_some(int lfd)
{
    int i;
    for (i = 0; i < 64; i++) {
        struct conn *c;
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                n_errors++;
            return;
        }
        n_accepted++;
        c = malloc(sizeof(*c));
        if (!c) {
            close(fd);
            n_errors++;
            continue;
        }
        c->fd = fd;
        c->passed_fd = -1;
        c->state = ST_HEAD;
        c->events = 0;
        c->have = 0;
        c->need = 0;
        c->cap = INLINE_BUF;
        c->buf = c->inline_buf;
        c->body_left = 0;
        c->stream_left = 0;
        c->out = NULL;
        c->out_len = 0;
        step_read(c);
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: backend [-p PORT | -u PATH [-F]] [-b BACKLOG]\n"
            "  uwsgi backend on 127.0.0.1:PORT (0 = any free port, printed as LISTEN ...)\n"
            "  or on the UNIX socket PATH; -F takes client descriptors passed with SCM_RIGHTS\n"
            "  answers a small HTTP/1.1 response; PATH_INFO=/bytes/N streams N bytes\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = 0, backlog = 4096, opt, lfd, one = 1;
    const char *upath = NULL;
    struct sockaddr_un su;
    struct sockaddr_in sa;
    socklen_t slen = sizeof(sa);
    struct epoll_event ev, events[MAX_EVENTS];
    struct sigaction act;
    struct rlimit rl;
    struct rusage ru;

    while ((opt = getopt(argc, argv, "p:b:u:Fh")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'u': upath = optarg; break;
        case 'F': take_fds = 1; break;
        case 'b': backlog = atoi(optarg); break;
        default: usage();
        }
    }
    if (port < 0 || port > 65535 || backlog < 1 || (take_fds && !upath) ||
        (upath && strlen(upath) >= sizeof(su.sun_path)))
        usage();

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
    act.sa_handler = on_report;
    sigaction(SIGUSR1, &act, NULL);
    memset(scratch, 'x', sizeof(scratch));

    if (upath) {
        lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        memset(&su, 0, sizeof(su));
        su.sun_family = AF_UNIX;
        strcpy(su.sun_path, upath);
        unlink(upath);
        if (lfd < 0 || bind(lfd, (struct sockaddr *)&su, sizeof(su)) < 0 || listen(lfd, backlog) < 0) {
            perror("unix bind/listen");
            return 1;
        }
        printf("LISTEN unix:%s\n", upath);
        fflush(stdout);
        goto serve;
    }
    lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        perror("socket");
        return 1;
    }
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, backlog) < 0) {
        perror("bind/listen");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&sa, &slen);
    printf("LISTEN 127.0.0.1:%d\n", ntohs(sa.sin_port));
    fflush(stdout);
serve:
    epfd = epoll_create1(EPOLL_CLOEXEC);
    ev.events = EPOLLIN;
    ev.data.ptr = NULL;
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);

    while (!stop_flag) {
        int i, n;
        if (report_flag) {
            report_flag = 0;
            printf("COUNTERS accepted=%llu requests=%llu errors=%llu fd_passed=%llu\n",
                   (unsigned long long)n_accepted, (unsigned long long)n_requests,
                   (unsigned long long)n_errors, (unsigned long long)n_fd_passed);
            fflush(stdout);
        }
        /* A bounded wait: a signal that lands between the flag checks above and
           the wait would otherwise be seen only with the next event, which never
           comes on an idle backend (the bench asks for the counters between runs). */
        n = epoll_wait(epfd, events, MAX_EVENTS, 100);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                accept_some(lfd);
            } else if (c->state == ST_WRITE) {
                if (events[i].events & (EPOLLERR | EPOLLHUP))
                    conn_close(c, 1);
                else
                    step_write(c);
            } else {
                step_read(c);
            }
        }
    }
    getrusage(RUSAGE_SELF, &ru);
    fprintf(stderr,
            "RESULT accepted=%llu requests=%llu errors=%llu fd_passed=%llu body_bytes_in=%llu bytes_out=%llu "
            "cpu_s=%.3f\n",
            (unsigned long long)n_accepted, (unsigned long long)n_requests,
            (unsigned long long)n_errors, (unsigned long long)n_fd_passed, (unsigned long long)body_bytes_in,
            (unsigned long long)bytes_out,
            ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    if (upath)
        unlink(upath);
    return 0;
}
