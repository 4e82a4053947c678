/* Replays pre-built IPv4 packets (ESP, IP-in-IP ...) at a fixed rate through a raw socket, for
 * bench_workers.py --live; compiled at run time with `cc -O2`.
 *
 *   rawload FILE RATE SECONDS
 *
 * FILE holds records of a 2-byte big-endian length and the whole IPv4 packet (header built by
 * the caller: IP_HDRINCL).  The packets are sent in order, at RATE per second against
 * CLOCK_MONOTONIC (what is due after a late wake-up goes out at once, in sendmmsg batches of
 * 64), until SECONDS have passed or the file is used up.  Prints one JSON object with the
 * packets sent, send errors and its own CPU time (getrusage), so its cost is known.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64

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

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: rawload FILE RATE SECONDS\n");
        return 2;
    }
    double rate = atof(argv[2]), seconds = atof(argv[3]);
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 1; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(size > 0 ? size : 1);
    if (!data || fread(data, 1, size, f) != (size_t)size) { perror("read"); return 1; }
    fclose(f);
    long count = 0;
    for (long off = 0; off + 2 <= size; count++)
        off += 2 + ((data[off] << 8) | data[off + 1]);
    unsigned char **pkt = malloc(sizeof(*pkt) * (count ? count : 1));
    unsigned *len = malloc(sizeof(*len) * (count ? count : 1));
    long n = 0;
    for (long off = 0; off + 2 <= size && n < count; n++) {
        len[n] = (data[off] << 8) | data[off + 1];
        pkt[n] = data + off + 2;
        off += 2 + len[n];
    }
    int sock = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (sock < 0) { perror("socket"); return 1; }
    int sndbuf = 8 << 20;
    setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in dst[BATCH];
    double start = now_s(), end = start + seconds, cpu0 = cpu_s();
    long sent = 0, errors = 0;
    while (sent + errors < count) {
        double t = now_s();
        if (t >= end) break;
        long due = rate > 0 ? (long)((t - start) * rate) + 1 - (sent + errors) : BATCH;
        if (due <= 0) {
            double next = start + (sent + errors) / rate;
            struct timespec ts = {(time_t)next, (long)((next - (time_t)next) * 1e9)};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            continue;
        }
        while (due > 0 && sent + errors < count) {
            int b = due < BATCH ? (int)due : BATCH;
            if (b > count - (sent + errors)) b = (int)(count - (sent + errors));
            for (int i = 0; i < b; i++) {
                long k = sent + errors + i;
                iov[i].iov_base = pkt[k];
                iov[i].iov_len = len[k];
                memset(&dst[i], 0, sizeof(dst[i]));
                dst[i].sin_family = AF_INET;
                memcpy(&dst[i].sin_addr, pkt[k] + 16, 4);
                memset(&msgs[i], 0, sizeof(msgs[i]));
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                msgs[i].msg_hdr.msg_name = &dst[i];
                msgs[i].msg_hdr.msg_namelen = sizeof(dst[i]);
            }
            int r = sendmmsg(sock, msgs, b, 0);
            if (r <= 0) { errors++; due--; continue; }
            sent += r;
            due -= r;
        }
    }
    printf("{\"sent\": %ld, \"errors\": %ld, \"packets\": %ld, \"seconds\": %.6f, "
           "\"cpu_s\": %.6f}\n", sent, errors, count, now_s() - start, cpu_s() - cpu0);
    return 0;
}
