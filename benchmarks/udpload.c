/* A UDP load generator and sink for bench_vs_strongswan.py, compiled at run time with `cc -O2`.
 *
 *   udpload send DST PORT SIZE RATE SECONDS   RATE 0 = as fast as the socket accepts
 *   udpload recv PORT SECONDS                 counts datagrams until SECONDS have passed
 *
 * Both print one JSON object on stdout.  The sender paces a fixed rate against CLOCK_MONOTONIC
 * (absolute sleeps, 1 ns timer slack; what is due after a late wake-up goes out at once, in one
 * sendmmsg) and blasts with sendmmsg batches of 64; the sink reads with recvmmsg batches of 256.
 * Each reports its own CPU time (getrusage), so the cost of the load tool is known.
 * Every datagram carries a 64-bit sequence number in its first 8 bytes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH_SEND 64
#define BATCH_RECV 256
#define MAX_SIZE 65507

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int do_send(const char *dst, int port, int size, double rate, double seconds) {
    static unsigned char bufs[BATCH_SEND][MAX_SIZE];
    struct mmsghdr msgs[BATCH_SEND];
    struct iovec iov[BATCH_SEND];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    int fd = socket(AF_INET, SOCK_DGRAM, 0), sndbuf = 4 << 20;
    if (fd < 0 || inet_pton(AF_INET, dst, &to.sin_addr) != 1 || size < 8 || size > MAX_SIZE) {
        fprintf(stderr, "udpload: bad socket/address/size\n");
        return 2;
    }
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    prctl(PR_SET_TIMERSLACK, 1UL);
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH_SEND; i++) {
        memset(bufs[i], 0x5a, size);
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &to;
        msgs[i].msg_hdr.msg_namelen = sizeof to;
    }
    uint64_t sent = 0, errors = 0;
    double cpu0 = cpu_s(), start = now_s(), end = start + seconds, t;
    while ((t = now_s()) < end) {
        uint64_t due = rate > 0 ? (uint64_t)((t - start) * rate) + 1 : sent + BATCH_SEND;
        if (due <= sent) {
            double next = start + (double)sent / rate;
            struct timespec ts = {(time_t)next, (long)((next - (time_t)next) * 1e9)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            continue;
        }
        int n = due - sent > BATCH_SEND ? BATCH_SEND : (int)(due - sent);
        for (int i = 0; i < n; i++) {
            uint64_t seq = sent + i;
            memcpy(bufs[i], &seq, 8);
        }
        int r = sendmmsg(fd, msgs, n, 0);
        if (r < 0) {          /* no route, ENOBUFS: the batch is lost, as on a wire */
            errors += n;
            sent += n;
        } else {
            sent += r;
            if (r < n) { errors += n - r; sent += n - r; }
        }
    }
    double stop = now_s();
    printf("{\"sent\": %llu, \"errors\": %llu, \"start\": %.6f, \"end\": %.6f, \"cpu_s\": %.6f}\n",
           (unsigned long long)sent, (unsigned long long)errors, start, stop, cpu_s() - cpu0);
    return 0;
}

static int do_recv(int port, double seconds) {
    static unsigned char bufs[BATCH_RECV][2048];
    struct mmsghdr msgs[BATCH_RECV];
    struct iovec iov[BATCH_RECV];
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(port)};
    int fd = socket(AF_INET, SOCK_DGRAM, 0), rcvbuf = 8 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct timeval tv = {0, 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (fd < 0 || bind(fd, (struct sockaddr *)&me, sizeof me) < 0) {
        perror("udpload: bind");
        return 2;
    }
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH_RECV; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    printf("{\"ready\": true}\n");
    fflush(stdout);
    uint64_t got = 0, bytes = 0, max_seq = 0;
    double cpu0 = cpu_s(), start = now_s(), end = start + seconds, first = 0, last = 0, t;
    while ((t = now_s()) < end) {
        int r = recvmmsg(fd, msgs, BATCH_RECV, MSG_WAITFORONE, NULL);
        if (r <= 0) continue;
        last = now_s();
        if (!got) first = last;
        for (int i = 0; i < r; i++) {
            uint64_t seq = 0;
            if (msgs[i].msg_len >= 8) memcpy(&seq, bufs[i], 8);
            if (seq > max_seq) max_seq = seq;
            bytes += msgs[i].msg_len;
        }
        got += r;
    }
    printf("{\"received\": %llu, \"bytes\": %llu, \"max_seq\": %llu, \"first\": %.6f, "
           "\"last\": %.6f, \"cpu_s\": %.6f}\n", (unsigned long long)got,
           (unsigned long long)bytes, (unsigned long long)max_seq, first, last, cpu_s() - cpu0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 7 && !strcmp(argv[1], "send"))
        return do_send(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atof(argv[6]));
    if (argc == 4 && !strcmp(argv[1], "recv"))
        return do_recv(atoi(argv[2]), atof(argv[3]));
    fprintf(stderr, "usage: udpload send DST PORT SIZE RATE SECONDS | recv PORT SECONDS\n");
    return 2;
}
