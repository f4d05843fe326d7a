/* A libnats (Debian's libnats-dev) client for perch's TLS tests: tests/it/tls.rs
 * compiles it with `cc tls_client.c -lnats` and runs it.
 *
 *   tls_client URL CA [CERT KEY]
 *
 * Connects with TLS (the server certificate checked against CA, a client
 * certificate if given), publishes to its own subscription and prints "ok"
 * once the message came back; anything else prints the error and exits 1. */
#include <stdio.h>
#include <string.h>

#include <nats/nats.h>

static int fail(const char *what, natsStatus s) {
    printf("error: %s: %s\n", what, natsStatus_GetText(s));
    return 1;
}

int main(int argc, char **argv) {
    natsOptions *opts = NULL;
    natsConnection *nc = NULL;
    natsSubscription *sub = NULL;
    natsMsg *msg = NULL;
    natsStatus s;
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: %s URL CA [CERT KEY]\n", argv[0]);
        return 2;
    }
    if ((s = natsOptions_Create(&opts)) != NATS_OK) return fail("options", s);
    if ((s = natsOptions_SetURL(opts, argv[1])) != NATS_OK) return fail("url", s);
    if ((s = natsOptions_SetSecure(opts, true)) != NATS_OK) return fail("secure", s);
    if ((s = natsOptions_LoadCATrustedCertificates(opts, argv[2])) != NATS_OK) return fail("ca", s);
    if (argc == 5 && (s = natsOptions_LoadCertificatesChain(opts, argv[3], argv[4])) != NATS_OK)
        return fail("client certificate", s);
    if ((s = natsOptions_SetTimeout(opts, 5000)) != NATS_OK) return fail("timeout", s);
    if ((s = natsOptions_SetMaxReconnect(opts, 0)) != NATS_OK) return fail("reconnect", s);
    if ((s = natsConnection_Connect(&nc, opts)) != NATS_OK) return fail("connect", s);
    if ((s = natsConnection_SubscribeSync(&sub, nc, "tls.c")) != NATS_OK) return fail("sub", s);
    if ((s = natsConnection_PublishString(nc, "tls.c", "hello over tls")) != NATS_OK) return fail("pub", s);
    if ((s = natsSubscription_NextMsg(&msg, sub, 5000)) != NATS_OK) return fail("next", s);
    if (strcmp(natsMsg_GetData(msg), "hello over tls") != 0) {
        printf("error: got %s\n", natsMsg_GetData(msg));
        return 1;
    }
    printf("ok\n");
    natsMsg_Destroy(msg);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(opts);
    nats_Close();
    return 0;
}
