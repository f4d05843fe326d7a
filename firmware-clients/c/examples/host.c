/* SPDX-License-Identifier: Apache-2.0 */
/*
 * host.c — the example programs' POSIX transports (see host.h). A lost or
 * refused datagram is not an error here: ICMP "port unreachable" while the
 * broker restarts turns into ECONNREFUSED on a connected UDP socket, and the
 * client's retries are what cover it.
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE

#include "host.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

uint32_t host_now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint32_t)((uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u);
}

void host_sleep_ms(uint32_t ms)
{
    struct timespec wait;
    wait.tv_sec = (time_t)(ms / 1000u);
    wait.tv_nsec = (long)(ms % 1000u) * 1000000L;
    while (nanosleep(&wait, &wait) != 0 && errno == EINTR) {
    }
}

int host_kind_from_name(const char *name)
{
    if (strcmp(name, "udp") == 0) {
        return HOST_UDP;
    }
    if (strcmp(name, "tcp") == 0) {
        return HOST_TCP;
    }
    if (strcmp(name, "serial") == 0) {
        return HOST_SERIAL;
    }
    return -1;
}

static uint32_t clock_of(void *context)
{
    (void)context;
    return host_now_ms();
}

/* Waits up to timeout_ms for the descriptor to be readable: 1, 0, or -1. */
static int wait_readable(int fd, uint32_t timeout_ms)
{
    struct pollfd pfd;
    int ready;
    pfd.fd = fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    do {
        ready = poll(&pfd, 1, (int)(timeout_ms > 60000u ? 60000u : timeout_ms));
    } while (ready < 0 && errno == EINTR);
    return ready;
}

static int write_all(int fd, const uint8_t *bytes, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, bytes, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                struct pollfd pfd;
                pfd.fd = fd;
                pfd.events = POLLOUT;
                (void)poll(&pfd, 1, 100);
                continue;
            }
            return -1;
        }
        bytes += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------- UDP */

static int32_t udp_send(void *context, const uint8_t *frame, size_t len)
{
    host_transport_t *host = context;
    if (send(host->fd, frame, len, 0) < 0 && errno != ECONNREFUSED && errno != EAGAIN) {
        perror("send");
        return -1;
    }
    return 0;
}

static int32_t udp_recv(void *context, uint8_t *buf, size_t cap, uint32_t timeout_ms)
{
    host_transport_t *host = context;
    ssize_t n;
    int ready = wait_readable(host->fd, timeout_ms);
    if (ready <= 0) {
        return ready;
    }
    n = recv(host->fd, buf, cap, 0);
    if (n < 0) {
        /* The broker's port is closed (it is restarting): nothing came. */
        return (errno == ECONNREFUSED || errno == EAGAIN || errno == EINTR) ? 0 : -1;
    }
    return (int32_t)n;
}

/* ------------------------------------------------------------------- TCP */

static int32_t tcp_send(void *context, const uint8_t *frame, size_t len)
{
    host_transport_t *host = context;
    uint8_t prefix[PERCH_TCP_PREFIX_BYTES_MAX];
    size_t prefix_len = perch_tcp_prefix(len, prefix);
    if (prefix_len == 0 || write_all(host->fd, prefix, prefix_len) != 0 ||
        write_all(host->fd, frame, len) != 0) {
        perror("tcp send");
        return -1;
    }
    return 0;
}

static int32_t tcp_recv(void *context, uint8_t *buf, size_t cap, uint32_t timeout_ms)
{
    host_transport_t *host = context;
    uint32_t start = host_now_ms();
    for (;;) {
        size_t offset;
        size_t frame_len;
        int32_t used = perch_tcp_split(host->pending, host->pending_len, &offset, &frame_len);
        uint32_t elapsed;
        ssize_t n;
        int ready;
        if (used < 0 || (used > 0 && frame_len > cap)) {
            fprintf(stderr, "tcp: broken framing from the broker\n");
            return -1;
        }
        if (used > 0) {
            memcpy(buf, host->pending + offset, frame_len);
            memmove(host->pending, host->pending + used, host->pending_len - (size_t)used);
            host->pending_len -= (size_t)used;
            return (int32_t)frame_len;
        }
        elapsed = host_now_ms() - start;
        if (host->pending_len == sizeof host->pending) {
            fprintf(stderr, "tcp: frame larger than the buffer\n");
            return -1;
        }
        ready = wait_readable(host->fd, elapsed >= timeout_ms ? 0 : timeout_ms - elapsed);
        if (ready <= 0) {
            return ready;
        }
        n = read(host->fd, host->pending + host->pending_len,
                 sizeof host->pending - host->pending_len);
        if (n <= 0) {
            fprintf(stderr, "tcp: connection closed\n");
            return -1;
        }
        host->pending_len += (size_t)n;
    }
}

/* ---------------------------------------------------------------- serial */

static int32_t serial_send(void *context, const uint8_t *frame, size_t len)
{
    host_transport_t *host = context;
    int32_t n = perch_serial_encode(frame, len, host->line, sizeof host->line);
    if (n < 0 || write_all(host->fd, host->line, (size_t)n) != 0) {
        perror("serial send");
        return -1;
    }
    return 0;
}

static int32_t serial_recv(void *context, uint8_t *buf, size_t cap, uint32_t timeout_ms)
{
    host_transport_t *host = context;
    uint32_t start = host_now_ms();
    for (;;) {
        size_t consumed = 0;
        const uint8_t *frame = NULL;
        size_t frame_len = 0;
        uint32_t elapsed;
        ssize_t n;
        int ready;
        if (host->pending_len > 0) {
            frame_len = perch_deframer_feed(&host->deframer, host->pending, host->pending_len,
                                            &consumed, &frame);
            memmove(host->pending, host->pending + consumed, host->pending_len - consumed);
            host->pending_len -= consumed;
        }
        if (frame_len > 0) {
            if (frame_len > cap) {
                continue; /* larger than the client takes: drop it */
            }
            memcpy(buf, frame, frame_len);
            return (int32_t)frame_len;
        }
        elapsed = host_now_ms() - start;
        ready = wait_readable(host->fd, elapsed >= timeout_ms ? 0 : timeout_ms - elapsed);
        if (ready <= 0) {
            return ready;
        }
        n = read(host->fd, host->pending, sizeof host->pending);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            continue;
        }
        if (n <= 0) {
            fprintf(stderr, "serial: line closed\n");
            return -1;
        }
        host->pending_len = (size_t)n;
    }
}

static speed_t baud_of(long baud)
{
    switch (baud) {
    case 9600:
        return B9600;
    case 19200:
        return B19200;
    case 38400:
        return B38400;
    case 57600:
        return B57600;
    case 230400:
        return B230400;
    default:
        return B115200;
    }
}

static int open_serial(host_transport_t *host, const char *path, const char *baud)
{
    struct termios tio;
    host->fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (host->fd < 0) {
        perror(path);
        return -1;
    }
    if (tcgetattr(host->fd, &tio) != 0) {
        perror("tcgetattr");
        return -1;
    }
    cfmakeraw(&tio);
    tio.c_cflag |= CLOCAL | CREAD;
    cfsetispeed(&tio, baud_of(strtol(baud, NULL, 10)));
    cfsetospeed(&tio, baud_of(strtol(baud, NULL, 10)));
    if (tcsetattr(host->fd, TCSANOW, &tio) != 0) {
        perror("tcsetattr");
        return -1;
    }
    perch_deframer_init(&host->deframer, host->deframe_buf, sizeof host->deframe_buf);
    /* A delimiter first flushes whatever partial frame the other end holds. */
    return write_all(host->fd, (const uint8_t *)"", 1);
}

static int open_socket(host_transport_t *host, int tcp, const char *name, const char *port)
{
    struct addrinfo hints;
    struct addrinfo *found = NULL;
    struct addrinfo *ai;
    int rc;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = tcp ? SOCK_STREAM : SOCK_DGRAM;
    rc = getaddrinfo(name, port, &hints, &found);
    if (rc != 0) {
        fprintf(stderr, "%s:%s: %s\n", name, port, gai_strerror(rc));
        return -1;
    }
    host->fd = -1;
    for (ai = found; ai != NULL && host->fd < 0; ai = ai->ai_next) {
        host->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (host->fd >= 0 && connect(host->fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            close(host->fd);
            host->fd = -1;
        }
    }
    freeaddrinfo(found);
    if (host->fd < 0) {
        fprintf(stderr, "%s:%s: cannot connect\n", name, port);
        return -1;
    }
    if (tcp) {
        int one = 1;
        (void)setsockopt(host->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return 0;
}

int host_open(host_transport_t *host, host_kind_t kind, const char *host_name,
              const char *port, perch_transport_t *transport)
{
    memset(host, 0, sizeof *host);
    host->kind = kind;
    transport->context = host;
    transport->now_ms = clock_of;
    switch (kind) {
    case HOST_UDP:
        transport->send = udp_send;
        transport->recv = udp_recv;
        return open_socket(host, 0, host_name, port);
    case HOST_TCP:
        transport->send = tcp_send;
        transport->recv = tcp_recv;
        return open_socket(host, 1, host_name, port);
    case HOST_SERIAL:
        transport->send = serial_send;
        transport->recv = serial_recv;
        return open_serial(host, host_name, port);
    }
    return -1;
}

int host_disconnect_is_final(const perch_event_t *event)
{
    return event->detail == PERCH_REASON_CLOSED ||
           (event->detail == PERCH_REASON_REFUSED &&
            (event->code == PERCH_CODE_NOT_PERMITTED ||
             event->code == PERCH_CODE_UNSUPPORTED_VERSION));
}

static char epoch_path[4096];

static int store_epoch_file(void *ctx, uint32_t next)
{
    char tmp[4200];
    FILE *file;
    (void)ctx;
    snprintf(tmp, sizeof tmp, "%s.tmp", epoch_path);
    file = fopen(tmp, "w");
    if (file == NULL) {
        return -1;
    }
    if (fprintf(file, "%lu\n", (unsigned long)next) < 0 || fclose(file) != 0) {
        return -1;
    }
    return rename(tmp, epoch_path) == 0 ? 0 : -1;
}

int host_keyring_from_env(perch_keyring_t *keyring)
{
    const char *path = getenv("PERCH_KEY_FILE");
    char text[130];
    uint8_t key[PERCH_KEY_BYTES];
    unsigned long first_epoch = 0;
    size_t i, len;
    FILE *file;
    if (path == NULL || path[0] == '\0') {
        return 0;
    }
    file = fopen(path, "r");
    if (file == NULL) {
        return -1;
    }
    len = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[len] = '\0';
    while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == ' ' || text[len - 1] == '\r')) {
        text[--len] = '\0';
    }
    if (len != 2 * PERCH_KEY_BYTES) {
        return -1;
    }
    for (i = 0; i < PERCH_KEY_BYTES; i++) {
        char pair[3] = {text[2 * i], text[2 * i + 1], '\0'};
        char *end;
        key[i] = (uint8_t)strtoul(pair, &end, 16);
        if (*end != '\0') {
            return -1;
        }
    }
    snprintf(epoch_path, sizeof epoch_path, "%s.epoch", path);
    file = fopen(epoch_path, "r");
    if (file != NULL) {
        if (fscanf(file, "%lu", &first_epoch) != 1) {
            first_epoch = 0;
        }
        fclose(file);
    }
    perch_keyring_init(keyring, key, (uint32_t)first_epoch, store_epoch_file, NULL);
    return 1;
}

int host_run(perch_client_t *client, perch_keyring_t *keyring,
             const perch_transport_t *transport, uint8_t *buf, size_t cap, uint32_t timeout_ms,
             perch_event_fn on_event, void *context)
{
    if (keyring) {
        return perch_run_sealed(client, keyring, transport, buf, cap, timeout_ms, on_event,
                                context);
    }
    return perch_run(client, transport, buf, cap, timeout_ms, on_event, context);
}
