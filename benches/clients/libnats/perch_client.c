/*
 * perch-client-libnats: benchmark traffic from the NATS C client (Debian's
 * libnats-dev), driven by perch-loadgen (benches/loadgen/src/clients.rs).
 * Same modes, flags and stdout lines as benches/clients/nats-go/main.go:
 *
 *   ready connect_ns=N
 *   window-start
 *   window-end delivered=N published=N elapsed_ns=N
 *   done delivered=N published=N
 *
 * Any error goes to stderr and exits 1. `-mode version` prints
 * "version libnats <version>" and exits.
 *
 * Build: gcc -O2 -o target/loadgen-clients/perch-client-libnats \
 *            benches/clients/libnats/perch_client.c -lnats -lpthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nats/nats.h>

/* libnats runs a reader and a flusher thread per connection; the fan-in's
 * thousands of connections need small stacks, not glibc's 8 MiB default. */
#define THREAD_STACK_BYTES (256 * 1024)

static const char *mode = "pub-sub";
static const char *url = "nats://127.0.0.1:4222";
static int payload_bytes = 16;
static int64_t warmup_ms = 300;
static int64_t duration_ms = 3000;
static uint64_t window_msgs = 100000;
static int devices = 8000;
static int msgs_per_device = 100;
static int connect_threads = 4;
static int64_t timeout_ms = 30000;

static atomic_uint_fast64_t received;
static atomic_bool closing;
static atomic_bool async_failed;
static char async_error[512];
static pthread_mutex_t error_lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("perch-client-libnats: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    _exit(1);
}

/* The library's last error text for this thread, or "". */
static const char *last_error(void) {
    const char *text = nats_GetLastError(NULL);
    return text == NULL ? "" : text;
}

static void check(natsStatus status, const char *what) {
    if (status != NATS_OK) {
        fail("%s: %s %s", what, natsStatus_GetText(status), last_error());
    }
}

static void record_failure(const char *format, ...) {
    pthread_mutex_lock(&error_lock);
    if (!atomic_load(&async_failed)) {
        va_list args;
        va_start(args, format);
        vsnprintf(async_error, sizeof async_error, format, args);
        va_end(args);
        atomic_store(&async_failed, true);
    }
    pthread_mutex_unlock(&error_lock);
}

static void check_async(void) {
    if (atomic_load(&async_failed)) {
        pthread_mutex_lock(&error_lock);
        fail("%s", async_error);
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void emit(const char *format, ...) {
    va_list args;
    va_start(args, format);
    vprintf(format, args);
    va_end(args);
    putchar('\n');
    if (fflush(stdout) != 0) {
        fail("writing to stdout failed");
    }
}

static void on_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure) {
    (void)nc;
    (void)sub;
    record_failure("%s: async error: %s", (const char *)closure, natsStatus_GetText(err));
}

static void on_disconnected(natsConnection *nc, void *closure) {
    (void)nc;
    if (!atomic_load(&closing)) {
        record_failure("%s: disconnected", (const char *)closure);
    }
}

/* One connection that never reconnects; async errors and unexpected
 * disconnects fail the run. `name` must outlive the connection. */
static natsStatus open_conn(natsConnection **nc, const char *name) {
    natsOptions *opts = NULL;
    natsStatus status = natsOptions_Create(&opts);
    if (status == NATS_OK) status = natsOptions_SetURL(opts, url);
    if (status == NATS_OK) status = natsOptions_SetName(opts, name);
    if (status == NATS_OK) status = natsOptions_SetAllowReconnect(opts, false);
    if (status == NATS_OK) status = natsOptions_SetTimeout(opts, timeout_ms);
    if (status == NATS_OK) status = natsOptions_SetErrorHandler(opts, on_error, (void *)name);
    if (status == NATS_OK) status = natsOptions_SetDisconnectedCB(opts, on_disconnected, (void *)name);
    if (status == NATS_OK) status = natsConnection_Connect(nc, opts);
    natsOptions_Destroy(opts);
    return status;
}

static void count_message(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure) {
    (void)nc;
    (void)sub;
    (void)closure;
    atomic_fetch_add_explicit(&received, 1, memory_order_relaxed);
    natsMsg_Destroy(msg);
}

static natsSubscription *subscribe(natsConnection *nc, const char *subject, natsMsgHandler handler) {
    natsSubscription *sub = NULL;
    check(natsConnection_Subscribe(&sub, nc, subject, handler, NULL), "subscribe");
    check(natsSubscription_SetPendingLimits(sub, -1, -1), "pending limits");
    /* The SUB is in place on the server once its PONG is back. */
    check(natsConnection_FlushTimeout(nc, timeout_ms), "subscriber flush");
    return sub;
}

/* ---- pub-sub ---- */

static atomic_bool stop_publisher;
static atomic_uint_fast64_t published;

struct publisher_args {
    natsConnection *nc;
    const char *payload;
    natsStatus status;
    uint64_t failed_after;
};

static void *publish_loop(void *arg) {
    struct publisher_args *p = arg;
    uint64_t count = 0;
    while (!atomic_load_explicit(&stop_publisher, memory_order_relaxed)) {
        if (count - atomic_load_explicit(&received, memory_order_relaxed) >= window_msgs) {
            if (atomic_load(&async_failed)) break;
            sleep_ns(50 * 1000);
            continue;
        }
        natsStatus status = natsConnection_Publish(p->nc, "bench.p", p->payload, payload_bytes);
        if (status != NATS_OK) {
            p->status = status;
            p->failed_after = count;
            break;
        }
        count++;
        if ((count & 255) == 0) atomic_store_explicit(&published, count, memory_order_relaxed);
    }
    atomic_store(&published, count);
    if (p->status == NATS_OK) {
        /* Everything published has been processed once this PONG is back. */
        p->status = natsConnection_FlushTimeout(p->nc, timeout_ms);
        p->failed_after = count;
    }
    return NULL;
}

static void pub_sub(void) {
    char *payload = malloc((size_t)payload_bytes + 1);
    memset(payload, 'x', (size_t)payload_bytes);
    natsConnection *sub_nc = NULL, *pub_nc = NULL;
    check(open_conn(&sub_nc, "perch-loadgen libnats subscriber"), "subscriber connect");
    natsSubscription *sub = subscribe(sub_nc, "bench.p", count_message);
    check(open_conn(&pub_nc, "perch-loadgen libnats publisher"), "publisher connect");
    emit("ready connect_ns=0");

    struct publisher_args args = {.nc = pub_nc, .payload = payload, .status = NATS_OK};
    pthread_t publisher;
    if (pthread_create(&publisher, NULL, publish_loop, &args) != 0) fail("starting the publisher thread");

    sleep_ns(warmup_ms * 1000000);
    check_async();
    uint64_t start_delivered = atomic_load(&received), start_published = atomic_load(&published);
    int64_t started = now_ns();
    emit("window-start");
    sleep_ns(duration_ms * 1000000);
    uint64_t end_delivered = atomic_load(&received), end_published = atomic_load(&published);
    int64_t elapsed = now_ns() - started;
    emit("window-end delivered=%" PRIu64 " published=%" PRIu64 " elapsed_ns=%" PRId64,
         end_delivered - start_delivered, end_published - start_published, elapsed);
    atomic_store(&stop_publisher, true);
    pthread_join(publisher, NULL);
    if (args.status != NATS_OK) {
        fail("publisher after %" PRIu64 " messages: %s", args.failed_after, natsStatus_GetText(args.status));
    }
    check_async();
    uint64_t total = atomic_load(&published);
    int64_t deadline = now_ns() + timeout_ms * 1000000;
    while (atomic_load(&received) < total) {
        check_async();
        if (now_ns() > deadline) {
            fail("subscriber received %" PRIu64 " of %" PRIu64 " messages within %" PRId64
                 " ms after publishing stopped",
                 (uint64_t)atomic_load(&received), total, timeout_ms);
        }
        sleep_ns(100 * 1000);
    }
    if (atomic_load(&received) != total) {
        fail("subscriber received %" PRIu64 " messages, %" PRIu64 " were published",
             (uint64_t)atomic_load(&received), total);
    }
    emit("done delivered=%" PRIu64 " published=%" PRIu64, (uint64_t)atomic_load(&received), total);
    atomic_store(&closing, true);
    natsConnection_Destroy(pub_nc);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(sub_nc);
    free(payload);
}

/* ---- fan-in ---- */

static uint64_t fan_in_expected;
static atomic_int_fast64_t finished_at_ns;
static pthread_mutex_t arrived_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t arrived_cond = PTHREAD_COND_INITIALIZER;

static void count_fan_in(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure) {
    (void)nc;
    (void)sub;
    (void)closure;
    natsMsg_Destroy(msg);
    if (atomic_fetch_add_explicit(&received, 1, memory_order_relaxed) + 1 == fan_in_expected) {
        atomic_store(&finished_at_ns, now_ns());
        pthread_mutex_lock(&arrived_lock);
        pthread_cond_signal(&arrived_cond);
        pthread_mutex_unlock(&arrived_lock);
    }
}

static natsConnection **device_conns;
static char **device_names;
static char **device_subjects;
static atomic_bool connect_failed;
static pthread_barrier_t release_barrier;
static const char *device_payload;

struct device_worker {
    pthread_t thread;
    int first;
    natsStatus status;
    int failed_id;
};

static void *connect_devices(void *arg) {
    struct device_worker *w = arg;
    for (int id = w->first; id < devices; id += connect_threads) {
        if (atomic_load(&connect_failed)) break;
        natsStatus status = open_conn(&device_conns[id], device_names[id]);
        if (status != NATS_OK) {
            w->status = status;
            w->failed_id = id;
            atomic_store(&connect_failed, true);
            break;
        }
    }
    return NULL;
}

static void *publish_devices(void *arg) {
    struct device_worker *w = arg;
    pthread_barrier_wait(&release_barrier);
    for (int id = w->first; id < devices; id += connect_threads) {
        for (int i = 0; i < msgs_per_device; i++) {
            natsStatus status =
                natsConnection_Publish(device_conns[id], device_subjects[id], device_payload, payload_bytes);
            if (status != NATS_OK) {
                w->status = status;
                w->failed_id = id;
                return NULL;
            }
        }
    }
    return NULL;
}

static void fan_in(void) {
    char *payload = malloc((size_t)payload_bytes + 1);
    memset(payload, 'x', (size_t)payload_bytes);
    device_payload = payload;
    fan_in_expected = (uint64_t)devices * (uint64_t)msgs_per_device;
    natsConnection *sub_nc = NULL;
    check(open_conn(&sub_nc, "perch-loadgen libnats subscriber"), "subscriber connect");
    natsSubscription *sub = subscribe(sub_nc, "sensors.>", count_fan_in);

    device_conns = calloc((size_t)devices, sizeof *device_conns);
    device_names = calloc((size_t)devices, sizeof *device_names);
    device_subjects = calloc((size_t)devices, sizeof *device_subjects);
    for (int id = 0; id < devices; id++) {
        if (asprintf(&device_names[id], "perch-loadgen libnats device %d", id) < 0 ||
            asprintf(&device_subjects[id], "sensors.%d.t", id) < 0) {
            fail("out of memory");
        }
    }
    struct device_worker *workers = calloc((size_t)connect_threads, sizeof *workers);
    int64_t connect_started = now_ns();
    for (int t = 0; t < connect_threads; t++) {
        workers[t].first = t;
        workers[t].status = NATS_OK;
        if (pthread_create(&workers[t].thread, NULL, connect_devices, &workers[t]) != 0) {
            fail("starting connect thread %d", t);
        }
    }
    for (int t = 0; t < connect_threads; t++) {
        pthread_join(workers[t].thread, NULL);
    }
    for (int t = 0; t < connect_threads; t++) {
        if (workers[t].status != NATS_OK) {
            fail("device %d connect: %s", workers[t].failed_id, natsStatus_GetText(workers[t].status));
        }
    }
    check_async();
    emit("ready connect_ns=%" PRId64, now_ns() - connect_started);

    /* As the raw fan-in: a few threads publish each of their devices' messages. */
    if (pthread_barrier_init(&release_barrier, NULL, (unsigned)connect_threads + 1) != 0) fail("barrier");
    for (int t = 0; t < connect_threads; t++) {
        if (pthread_create(&workers[t].thread, NULL, publish_devices, &workers[t]) != 0) {
            fail("starting publish thread %d", t);
        }
    }
    emit("window-start");
    int64_t started = now_ns();
    pthread_barrier_wait(&release_barrier);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (timeout_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&arrived_lock);
    while (atomic_load(&received) < fan_in_expected && !atomic_load(&async_failed)) {
        /* Woken by the last message; re-checks errors every 100 ms. */
        struct timespec step;
        clock_gettime(CLOCK_REALTIME, &step);
        step.tv_nsec += 100 * 1000000;
        if (step.tv_nsec >= 1000000000) {
            step.tv_sec++;
            step.tv_nsec -= 1000000000;
        }
        if (step.tv_sec > deadline.tv_sec || (step.tv_sec == deadline.tv_sec && step.tv_nsec > deadline.tv_nsec)) {
            step = deadline;
        }
        int rc = pthread_cond_timedwait(&arrived_cond, &arrived_lock, &step);
        if (rc == ETIMEDOUT && step.tv_sec == deadline.tv_sec && step.tv_nsec == deadline.tv_nsec &&
            atomic_load(&received) < fan_in_expected) {
            pthread_mutex_unlock(&arrived_lock);
            check_async();
            fail("subscriber received %" PRIu64 " of %" PRIu64 " messages within %" PRId64 " ms",
                 (uint64_t)atomic_load(&received), fan_in_expected, timeout_ms);
        }
    }
    pthread_mutex_unlock(&arrived_lock);
    check_async();
    int64_t elapsed = atomic_load(&finished_at_ns) - started;
    emit("window-end delivered=%" PRIu64 " published=%" PRIu64 " elapsed_ns=%" PRId64, fan_in_expected,
         fan_in_expected, elapsed);
    for (int t = 0; t < connect_threads; t++) {
        pthread_join(workers[t].thread, NULL);
        if (workers[t].status != NATS_OK) {
            fail("device %d publish: %s", workers[t].failed_id, natsStatus_GetText(workers[t].status));
        }
    }
    /* No more than expected: nothing else publishes to sensors.>. */
    sleep_ns(10 * 1000000);
    check_async();
    if (atomic_load(&received) != fan_in_expected) {
        fail("subscriber received %" PRIu64 " messages, %" PRIu64 " were published",
             (uint64_t)atomic_load(&received), fan_in_expected);
    }
    emit("done delivered=%" PRIu64 " published=%" PRIu64, fan_in_expected, fan_in_expected);
    atomic_store(&closing, true);
    for (int id = 0; id < devices; id++) {
        natsConnection_Destroy(device_conns[id]);
    }
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(sub_nc);
}

/* ---- flags ---- */

static int64_t int_flag(const char *name, const char *value, int64_t min) {
    char *end = NULL;
    errno = 0;
    long long parsed = strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || parsed < min) {
        fail("bad value for -%s: %s", name, value);
    }
    return (int64_t)parsed;
}

static void parse_flags(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        while (*flag == '-') flag++;
        if (i + 1 >= argc) fail("-%s needs a value", flag);
        const char *value = argv[++i];
        if (strcmp(flag, "mode") == 0) mode = value;
        else if (strcmp(flag, "url") == 0) url = value;
        else if (strcmp(flag, "payload") == 0) payload_bytes = (int)int_flag(flag, value, 0);
        else if (strcmp(flag, "warmup-ms") == 0) warmup_ms = int_flag(flag, value, 0);
        else if (strcmp(flag, "duration-ms") == 0) duration_ms = int_flag(flag, value, 1);
        else if (strcmp(flag, "window") == 0) window_msgs = (uint64_t)int_flag(flag, value, 1);
        else if (strcmp(flag, "devices") == 0) devices = (int)int_flag(flag, value, 1);
        else if (strcmp(flag, "msgs-per-device") == 0) msgs_per_device = (int)int_flag(flag, value, 1);
        else if (strcmp(flag, "connect-threads") == 0) connect_threads = (int)int_flag(flag, value, 1);
        else if (strcmp(flag, "timeout-ms") == 0) timeout_ms = int_flag(flag, value, 1);
        else fail("unknown flag -%s", flag);
    }
}

static void *watchdog(void *arg) {
    int64_t limit_ms = *(int64_t *)arg;
    sleep_ns(limit_ms * 1000000);
    fail("still running after %" PRId64 " ms", limit_ms);
    return NULL;
}

int main(int argc, char **argv) {
    parse_flags(argc, argv);
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0 || pthread_attr_setstacksize(&attr, THREAD_STACK_BYTES) != 0 ||
        pthread_setattr_default_np(&attr) != 0) {
        fail("setting the default thread stack size");
    }
    static int64_t limit_ms;
    limit_ms = warmup_ms + duration_ms + 4 * timeout_ms;
    pthread_t watchdog_thread;
    if (pthread_create(&watchdog_thread, NULL, watchdog, &limit_ms) != 0) fail("starting the watchdog");
    check(nats_Open(-1), "nats_Open");
    if (strcmp(mode, "version") == 0) {
        emit("version libnats %s", nats_GetVersion());
    } else if (strcmp(mode, "pub-sub") == 0) {
        pub_sub();
    } else if (strcmp(mode, "fan-in") == 0) {
        fan_in();
    } else {
        fail("unknown -mode %s (pub-sub, fan-in or version)", mode);
    }
    /* Skip the library's teardown of thousands of connections' threads. */
    fflush(stdout);
    _exit(0);
}
