/*
 * dgramsend.c - sends prepared subscription datagrams as fast as a router takes them.
 *
 * Usage: dgramsend -f FILE (-x UNIX_PATH | -u UDP_PORT) [-q BYTES]
 *
 * Theory of operation
 * -------------------
 * FILE holds the datagrams, each as a 4-byte little-endian length and its bytes
 * (bench/subscriptions.py writes it).  They are sent in order, once, to a UNIX
 * datagram socket (-x) or to 127.0.0.1:PORT over UDP (-u), then the line
 * "SENT <count> <seconds>" is printed.
 *
 * Nothing may be lost and the sender must not be what limits the rate:
 *   - UNIX: the socket is blocking, so the kernel makes the sender wait while the
 *     router's queue is full.
 *   - UDP: the kernel drops what does not fit in the receiver's buffer, so every 32
 *     datagrams the receive queue of the router's socket is read from
 *     /proc/net/udp and the sender pauses (200 us at a time) while it holds more
 *     than -q bytes (default 106496, half of the usual rmem_default).
 * A Python sender spends several microseconds per datagram, which is about what a
 * C router spends on it: this one spends well under one.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The rx_queue (bytes) of the IPv4 UDP socket bound to port, or -1 if not found. */
static long udp_rx_queue(unsigned port) {
    static char buf[1 << 16];
    FILE *f = fopen("/proc/net/udp", "r");
    long found = -1;
    if (!f)
        return -1;
    if (!fgets(buf, sizeof buf, f)) { /* header line */
        fclose(f);
        return -1;
    }
    while (fgets(buf, sizeof buf, f)) {
        unsigned local_port = 0;
        unsigned long tx = 0, rx = 0;
        if (sscanf(buf, " %*d: %*8X:%4X %*8X:%*4X %*2X %8lX:%8lX", &local_port, &tx, &rx) == 3
            && local_port == port) {
            found = (long)rx;
            break;
        }
    }
    fclose(f);
    return found;
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(n > 0 ? (size_t)n : 1);
    if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *size = (size_t)n;
    return data;
}

int main(int argc, char **argv) {
    const char *file = NULL, *unix_path = NULL;
    unsigned port = 0;
    long limit = 106496;
    int opt;
    while ((opt = getopt(argc, argv, "f:x:u:q:")) != -1) {
        switch (opt) {
        case 'f': file = optarg; break;
        case 'x': unix_path = optarg; break;
        case 'u': port = (unsigned)atoi(optarg); break;
        case 'q': limit = atol(optarg); break;
        default:
            fprintf(stderr, "usage: %s -f FILE (-x UNIX_PATH | -u UDP_PORT) [-q BYTES]\n", argv[0]);
            return 2;
        }
    }
    if (!file || (!unix_path == !port)) {
        fprintf(stderr, "usage: %s -f FILE (-x UNIX_PATH | -u UDP_PORT) [-q BYTES]\n", argv[0]);
        return 2;
    }
    size_t size;
    unsigned char *data = read_file(file, &size);

    struct sockaddr_storage ss;
    socklen_t sslen;
    memset(&ss, 0, sizeof ss);
    int fd;
    if (unix_path) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&ss;
        sun->sun_family = AF_UNIX;
        if (strlen(unix_path) >= sizeof sun->sun_path) {
            fprintf(stderr, "path too long: %s\n", unix_path);
            return 2;
        }
        strcpy(sun->sun_path, unix_path);
        sslen = sizeof *sun;
        fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sslen = sizeof *sin;
        fd = socket(AF_INET, SOCK_DGRAM, 0);
    }
    if (fd < 0) {
        perror("socket");
        return 1;
    }

    double t0 = now_s();
    size_t pos = 0;
    long count = 0;
    while (pos + 4 <= size) {
        uint32_t len = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16 | (uint32_t)data[pos + 3] << 24;
        pos += 4;
        if (pos + len > size) {
            fprintf(stderr, "truncated datagram file\n");
            return 2;
        }
        if (port && count % 32 == 0) {
            while (udp_rx_queue(port) > limit) {
                struct timespec pause = {0, 200000};
                nanosleep(&pause, NULL);
            }
        }
        while (sendto(fd, data + pos, len, 0, (struct sockaddr *)&ss, sslen) < 0) {
            if (errno != EINTR) {
                perror("sendto");
                return 1;
            }
        }
        pos += len;
        count++;
    }
    printf("SENT %ld %.6f\n", count, now_s() - t0);
    fflush(stdout);
    close(fd);
    free(data);
    return 0;
}
