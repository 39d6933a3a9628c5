/*
 * c_api_test.c - C tests of libiot_ota, run by tests/c_api.rs against a real
 * Mosquitto and the testkit's HTTP server (the Rust side plays the platform
 * and checks the wire).
 *
 *   c_api_test params
 *   c_api_test happy  HOST PORT PK DN OUTDIR VERSION1 SIZE1 VERSION2 SIZE2
 *   c_api_test fail   HOST PORT PK DN EXPECTED_ERR
 *   c_api_test stall  HOST PORT PK DN SENT_BYTES
 *   c_api_test get    HOST PORT PK DN OUTDIR VERSION_OK VERSION_MISSING
 *   c_api_test slow   HOST PORT PK DN
 *   c_api_test reconnect HOST PORT PK DN
 *   c_api_test selfreport HOST PORT PK DN
 *   c_api_test ackjournal HOST PORT PK DN STATE_DIR
 *
 * Every check that fails prints its line and exits with 2.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "iot_ota.h"

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(2);                                                                \
        }                                                                           \
    } while (0)

#define CHECK_EQ(actual, expected)                                                  \
    do {                                                                            \
        long long a_ = (long long)(actual), e_ = (long long)(expected);             \
        if (a_ != e_) {                                                             \
            fprintf(stderr, "%s:%d: %s is %lld, expected %s = %lld\n", __FILE__,    \
                    __LINE__, #actual, a_, #expected, e_);                          \
            exit(2);                                                                \
        }                                                                           \
    } while (0)

#define BUF_SIZE 5000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* What a callback saw. */
struct seen {
    int calls;
    int type;
    char topic[256];
    char payload[4096];
    unsigned payload_len;
};

static void on_message(void *user_data, iot_mqtt_sub_type_t type, const char *topic,
                       const char *payload, uint32_t payload_len)
{
    struct seen *s = user_data;
    s->calls++;
    s->type = (int)type;
    snprintf(s->topic, sizeof(s->topic), "%s", topic);
    snprintf(s->payload, sizeof(s->payload), "%s", payload);
    s->payload_len = payload_len;
    /* Payloads are NUL-terminated, and the length excludes the NUL. */
    CHECK_EQ(strlen(payload), payload_len);
}

static iot_mqtt_t *connect_mqtt(const char *host, const char *port, const char *client_id)
{
    iot_mqtt_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.host = host;
    cfg.port = (uint16_t)atoi(port);
    cfg.client_id = client_id;
    cfg.keep_alive_s = 5;
    iot_mqtt_t *m = iot_mqtt_create(&cfg);
    CHECK(m != NULL);
    CHECK_EQ(iot_mqtt_is_connected(m), 0);
    CHECK_EQ(iot_mqtt_connect(m, 10000), IOT_OTA_ERR_NONE);
    CHECK_EQ(iot_mqtt_is_connected(m), 1);
    return m;
}

/* Yields until the OTA instance is fetching. */
static void wait_fetching(iot_mqtt_t *m, void *ota, double seconds)
{
    double deadline = now_s() + seconds;
    while (iot_ota_is_fetching(ota) != 1) {
        CHECK(now_s() < deadline);
        CHECK_EQ(iot_mqtt_yield(m, 200), IOT_OTA_ERR_NONE);
    }
}

/* Yields until the callback has been called `calls` times. */
static void wait_calls(iot_mqtt_t *m, const struct seen *s, int calls, double seconds)
{
    double deadline = now_s() + seconds;
    while (s->calls < calls) {
        CHECK(now_s() < deadline);
        CHECK_EQ(iot_mqtt_yield(m, 200), IOT_OTA_ERR_NONE);
    }
}

/* Lets the MQTT instance send what is queued. */
static void flush(iot_mqtt_t *m)
{
    double deadline = now_s() + 0.3;
    while (now_s() < deadline) iot_mqtt_yield(m, 100);
}

/* Fetches the whole current upgrade into `path` (unless NULL), checking the
 * state functions and counters on the way; returns the bytes fetched. The
 * first `slow_chunks` chunks are taken 5 ms apart: a reader slower than the
 * download, so that the library's read-ahead fills its blocks and waits for
 * the reader to give them back. */
static long long fetch_all(void *ota, const char *path, int slow_chunks)
{
    static char buf[BUF_SIZE];
    FILE *out = path ? fopen(path, "wb") : NULL;
    CHECK(path == NULL || out != NULL);
    long long total = iot_ota_file_size(ota);
    long long got = 0;
    CHECK_EQ(iot_ota_fetched_size(ota), 0);
    for (;;) {
        int n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1);
        if (n > 0) {
            CHECK(n <= BUF_SIZE);
            got += n;
            if (slow_chunks > 0) {
                slow_chunks--;
                struct timespec pause = {0, 5 * 1000 * 1000};
                nanosleep(&pause, NULL);
            }
            if (out) CHECK_EQ(fwrite(buf, 1, (size_t)n, out), n);
            CHECK_EQ(iot_ota_fetched_size(ota), got);
            if (total > 0 && got < total) {
                CHECK_EQ(iot_ota_is_fetching(ota), 1);
                CHECK_EQ(iot_ota_fetch_finish(ota), 0);
                CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_FETCHING);
                CHECK_EQ(iot_ota_check_firmware(ota), IOT_OTA_ERR_INVALID_STATE);
            } else if (total > 0) {
                /* The call returning the last bytes has verified them. */
                CHECK_EQ(got, total);
                CHECK_EQ(iot_ota_is_fetching(ota), 0);
                CHECK_EQ(iot_ota_fetch_finish(ota), 1);
                CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_FETCHED);
            }
        } else if (n == 0) {
            continue; /* nothing within 1 s: call again */
        } else {
            CHECK_EQ(n, IOT_OTA_ERR_INVALID_STATE);
            break;
        }
    }
    /* Negative for good once ended. */
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_is_fetching(ota), 0);
    CHECK_EQ(iot_ota_fetch_finish(ota), 1);
    CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_FETCHED);
    CHECK_EQ(iot_ota_check_firmware(ota), IOT_OTA_ERR_NONE);
    CHECK_EQ(iot_ota_fetched_size(ota), got);
    if (out) CHECK_EQ(fclose(out), 0);
    return got;
}

static void report_success(iot_mqtt_t *m, void *ota, const char *version)
{
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADING, 100), 0);
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_SUCCESS, 100), 0);
    CHECK_EQ(iot_ota_report_firmware_version(ota, version), 0);
    flush(m);
}

/* ---- params: every invalid-parameter case ---- */

static void check_bad_ota_handle(void *h)
{
    char buf[80];
    iot_ota_firmware_t fw;
    CHECK_EQ(iot_ota_report_progress(h, IOT_OTA_STATUS_DOWNLOADING, 0), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_firmware_version(h, "1.0"), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_is_fetching(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetch_finish(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetch_yield(h, buf, sizeof(buf), 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_get_firmware_info(h, "pk", "dn", "1.0"), -1);
    CHECK_EQ(iot_ota_fetch_state(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_get_firmware(h, &fw), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_check_firmware(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_get_digest(h, buf, sizeof(buf)), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetched_size(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_file_size(h), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_set_state_dir(h, "/tmp"), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_boot_confirm(h, "1.0", 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_install_done(h, 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_trust_key(h, "/nonexistent.pem"), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_revoke_key(h, "00"), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_destroy(h), IOT_OTA_ERR_INVALID_PARAM);
}

static void check_bad_mqtt_handle(iot_mqtt_t *m)
{
    struct seen s;
    CHECK_EQ(iot_mqtt_connect(m, 10), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_yield(m, 10), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_subscribe(m, MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE, on_message, &s),
             IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_is_connected(m), IOT_OTA_ERR_INVALID_PARAM);
    CHECK(iot_ota_init("pk", "dn", m) == NULL);
    CHECK_EQ(iot_mqtt_destroy(m), IOT_OTA_ERR_INVALID_PARAM);
}

static int scenario_params(void)
{
    char buf[128];
    char long_version[200];
    int junk = 42;
    struct seen s;
    iot_ota_firmware_t fw;
    memset(long_version, 'a', sizeof(long_version) - 1);
    long_version[sizeof(long_version) - 1] = '\0';

    CHECK(strcmp(iot_ota_strerror(IOT_OTA_ERR_INVALID_PARAM), "invalid parameter") == 0);
    CHECK(strcmp(iot_ota_strerror(IOT_OTA_ERR_NONE), "success") == 0);
    CHECK(strcmp(iot_ota_strerror(12345), "unknown error") == 0);

    /* iot_mqtt_create: NULL config, missing or invalid fields. */
    iot_mqtt_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    CHECK(iot_mqtt_create(NULL) == NULL);
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.host = "127.0.0.1";
    CHECK(iot_mqtt_create(&cfg) == NULL); /* no client id */
    cfg.client_id = "";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.client_id = "\xff\xfe";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.client_id = "params";
    cfg.host = "\xc3\x28";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.host = "127.0.0.1";
    cfg.username = "\xff";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.username = NULL;
    cfg.ca_file = "/nonexistent/ca.pem";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.ca_file = NULL;
    cfg.download_ca_file = "/nonexistent/ca.pem";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.download_ca_file = "";
    CHECK(iot_mqtt_create(&cfg) == NULL);
    cfg.download_ca_file = NULL;
    cfg.port = 1; /* nobody listens there */
    iot_mqtt_t *m = iot_mqtt_create(&cfg);
    CHECK(m != NULL);

    /* MQTT functions with NULL, foreign and (below) stale handles. */
    check_bad_mqtt_handle(NULL);
    check_bad_mqtt_handle((iot_mqtt_t *)&junk);
    CHECK_EQ(iot_mqtt_subscribe(m, (iot_mqtt_sub_type_t)0, on_message, &s), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_subscribe(m, (iot_mqtt_sub_type_t)3, on_message, &s), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_subscribe(m, MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE, NULL, NULL), 0);
    CHECK_EQ(iot_mqtt_yield(m, 10), IOT_OTA_ERR_INVALID_STATE); /* before connect */
    CHECK_EQ(iot_mqtt_is_connected(m), 0);

    /* iot_ota_init: NULL, non-UTF-8, invalid identities, bad MQTT handles. */
    CHECK(iot_ota_init(NULL, "dn", m) == NULL);
    CHECK(iot_ota_init("pk", NULL, m) == NULL);
    CHECK(iot_ota_init("pk", "dn", NULL) == NULL);
    CHECK(iot_ota_init("pk", "dn", &junk) == NULL);
    CHECK(iot_ota_init("\xff\xfe", "dn", m) == NULL);
    CHECK(iot_ota_init("pk", "\xc3\x28", m) == NULL);
    CHECK(iot_ota_init("", "dn", m) == NULL);
    CHECK(iot_ota_init("p/k", "dn", m) == NULL);
    CHECK(iot_ota_init("pk", "d n", m) == NULL);
    CHECK(iot_ota_init("pk", "d#", m) == NULL);
    void *ota = iot_ota_init("pk", "dn", m);
    CHECK(ota != NULL);
    CHECK(iot_ota_init("pk", "dn", m) == NULL); /* that device already has one */

    /* Handles of the wrong type are foreign. */
    CHECK_EQ(iot_ota_is_fetching(m), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_yield((iot_mqtt_t *)ota, 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK(iot_ota_init("pk", "dn3", ota) == NULL);

    /* Every OTA function with NULL and a foreign pointer. */
    check_bad_ota_handle(NULL);
    check_bad_ota_handle(&junk);
    CHECK_EQ(iot_ota_destroy(NULL), IOT_OTA_ERR_INVALID_PARAM); /* harmless */

    /* Bad arguments on a live handle. */
    CHECK_EQ(iot_ota_report_progress(ota, (iot_ota_status_t)0, 0), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_progress(ota, (iot_ota_status_t)5, 0), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_progress(ota, (iot_ota_status_t)-5, 0), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_DOWNLOADING, 101), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_firmware_version(ota, NULL), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_firmware_version(ota, ""), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "\xff\xfe"), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_report_firmware_version(ota, long_version), IOT_OTA_ERR_STR_TOO_LONG);
    CHECK_EQ(iot_ota_fetch_yield(ota, NULL, 10, 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, 0, 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, sizeof(buf), 0), IOT_OTA_ERR_INVALID_STATE); /* no upgrade */
    /* The guide: iot_ota_get_firmware_info returns -1 on every failure. */
    CHECK_EQ(iot_ota_get_firmware_info(ota, NULL, "dn", "2.0"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", NULL, "2.0"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", NULL), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", ""), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "other", "dn", "2.0"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "other", "2.0"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "\xff", "dn", "2.0"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", "\xff"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", long_version), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", "2.0 beta"), -1);
    CHECK_EQ(iot_ota_get_firmware_info(ota, "pk", "dn", ".."), -1);
    CHECK_EQ(iot_ota_get_firmware(ota, NULL), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_get_firmware(ota, &fw), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_check_firmware(ota), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_get_digest(ota, NULL, 10), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_get_digest(ota, buf, sizeof(buf)), IOT_OTA_ERR_INVALID_STATE);

    /* The state of an instance whose MQTT instance never connected. */
    CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_UNINIT);
    CHECK_EQ(iot_ota_is_fetching(ota), 0);
    CHECK_EQ(iot_ota_fetch_finish(ota), 0);
    CHECK_EQ(iot_ota_fetched_size(ota), 0);
    CHECK_EQ(iot_ota_file_size(ota), 0);
    /* Valid calls are queued until the connection is up. */
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADING, 0), 0);
    int id = iot_ota_get_firmware_info(ota, "pk", "dn", "2.0");
    CHECK(id > 0);

    /* Destroyed handles are stale. */
    CHECK_EQ(iot_ota_destroy(ota), 0);
    check_bad_ota_handle(ota);

    /* A connection that fails: nobody listens on port 1. */
    CHECK_EQ(iot_mqtt_connect(m, 5000), IOT_OTA_ERR_MQTT_FAILED);
    CHECK_EQ(iot_mqtt_is_connected(m), 0);
    CHECK_EQ(iot_mqtt_yield(m, 10), IOT_OTA_ERR_MQTT_FAILED);

    /* An OTA instance left on a destroyed MQTT instance. */
    void *orphan = iot_ota_init("pk", "dn2", m);
    CHECK(orphan != NULL);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    check_bad_mqtt_handle(m);
    CHECK_EQ(iot_ota_report_firmware_version(orphan, "1.0"), IOT_OTA_ERR_MQTT_FAILED);
    CHECK_EQ(iot_ota_fetch_yield(orphan, buf, sizeof(buf), 1), IOT_OTA_ERR_MQTT_FAILED);
    CHECK_EQ(iot_ota_get_firmware_info(orphan, "pk", "dn2", "2.0"), -1);
    CHECK_EQ(iot_ota_destroy(orphan), 0);
    CHECK_EQ(iot_ota_destroy(orphan), IOT_OTA_ERR_INVALID_PARAM);
    printf("params ok\n");
    return 0;
}

/* ---- happy: two upgrades in a row, every state on the way ---- */

static int scenario_happy(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3], *dir = argv[4];
    struct seen upgrades;
    memset(&upgrades, 0, sizeof(upgrades));
    iot_mqtt_t *m = connect_mqtt(host, port, "c-happy");
    CHECK_EQ(iot_mqtt_subscribe(m, MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE, on_message, &upgrades), 0);
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);

    char buf[BUF_SIZE];
    iot_ota_firmware_t fw;
    CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_INIT);
    CHECK_EQ(iot_ota_is_fetching(ota), 0);
    CHECK_EQ(iot_ota_fetch_finish(ota), 0);
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, BUF_SIZE, 0), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_get_firmware(ota, &fw), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);

    for (int round = 1; round <= 2; round++) {
        const char *version = argv[3 + 2 * round];
        long long size = atoll(argv[4 + 2 * round]);
        wait_fetching(m, ota, 30);

        /* The callback saw the command before the state changed. */
        CHECK_EQ(upgrades.calls, round);
        CHECK_EQ(upgrades.type, MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE);
        CHECK(strstr(upgrades.topic, "/ota/firmware/upgrade") != NULL);
        CHECK(strstr(upgrades.payload, version) != NULL);

        /* Fresh counters and digest for every accepted command. */
        CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_FETCHING);
        CHECK_EQ(iot_ota_fetch_finish(ota), 0);
        CHECK_EQ(iot_ota_fetched_size(ota), 0);
        CHECK_EQ(iot_ota_file_size(ota), size);
        char digest[IOT_OTA_SIGN_MAX + 1];
        CHECK_EQ(iot_ota_get_digest(ota, digest, 10), IOT_OTA_ERR_STR_TOO_LONG);
        CHECK_EQ(iot_ota_get_digest(ota, digest, sizeof(digest)), 32);
        CHECK(strcmp(digest, "d41d8cd98f00b204e9800998ecf8427e") == 0); /* MD5 of nothing */
        CHECK_EQ(iot_ota_check_firmware(ota), IOT_OTA_ERR_INVALID_STATE);

        CHECK_EQ(iot_ota_get_firmware(ota, &fw), 0);
        CHECK(strcmp(fw.version, version) == 0);
        CHECK_EQ(fw.size, size);
        CHECK(strncmp(fw.url, "http://", 7) == 0);
        CHECK(strcmp(fw.sign_method, "Md5") == 0);
        CHECK(strcmp(fw.policy, "standard") == 0);
        CHECK_EQ(strlen(fw.sign), 32);

        char path[512];
        snprintf(path, sizeof(path), "%s/round-%d.bin", dir, round);
        /* Round 1's image (300 KB) is larger than the read-ahead's blocks. */
        CHECK_EQ(fetch_all(ota, path, round == 1 ? 20 : 0), size);
        CHECK_EQ(iot_ota_file_size(ota), size);
        CHECK_EQ(iot_ota_get_digest(ota, digest, sizeof(digest)), 32);
        CHECK(strcmp(digest, fw.sign) == 0);
        report_success(m, ota, version);
        printf("round %d ok\n", round);
        fflush(stdout);
    }
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    return 0;
}

/* ---- fail: the download fails with EXPECTED_ERR ---- */

static int scenario_fail(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    int expected = atoi(argv[4]);
    iot_mqtt_t *m = connect_mqtt(host, port, "c-fail");
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    wait_fetching(m, ota, 30);
    static char buf[BUF_SIZE];
    int n;
    do {
        n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1);
    } while (n >= 0);
    CHECK_EQ(n, expected);
    /* The same error on every later call. */
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1), expected);
    CHECK_EQ(iot_ota_is_fetching(ota), 0);
    CHECK_EQ(iot_ota_fetch_finish(ota), 1);
    CHECK_EQ(iot_ota_fetch_state(ota), IOT_OTA_FETCH_STATE_FETCHED);
    CHECK_EQ(iot_ota_check_firmware(ota), expected);
    flush(m);
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    printf("fail ok\n");
    return 0;
}

/* ---- stall: timeouts return 0; destroy in the middle of the fetch ---- */

static int scenario_stall(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    long long sent = atoll(argv[4]);
    iot_mqtt_t *m = connect_mqtt(host, port, "c-stall");
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    wait_fetching(m, ota, 30);
    static char buf[BUF_SIZE];
    long long got = 0;
    double deadline = now_s() + 20;
    while (got < sent) {
        CHECK(now_s() < deadline);
        int n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1);
        CHECK(n >= 0);
        got += n;
    }
    CHECK_EQ(got, sent);
    for (int i = 0; i < 2; i++) {
        double t0 = now_s();
        CHECK_EQ(iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1), 0);
        double waited = now_s() - t0;
        CHECK(waited >= 0.9 && waited < 5.0);
    }
    CHECK_EQ(iot_ota_is_fetching(ota), 1);
    CHECK_EQ(iot_ota_fetch_finish(ota), 0);
    CHECK_EQ(iot_ota_fetched_size(ota), sent);
    CHECK_EQ(iot_ota_check_firmware(ota), IOT_OTA_ERR_INVALID_STATE);

    /* Destroy in the middle of the fetch: cancelled and reported. */
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_ota_is_fetching(ota), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_destroy(ota), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_mqtt_destroy(m), 0); /* sends the failure report */
    printf("stall ok\n");
    return 0;
}

/* ---- get: iot_ota_get_firmware_info, a reply with firmware, then a 404 ---- */

static int scenario_get(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3], *dir = argv[4];
    const char *found = argv[5], *missing = argv[6];
    struct seen replies;
    memset(&replies, 0, sizeof(replies));
    iot_mqtt_t *m = connect_mqtt(host, port, "c-get");
    CHECK_EQ(iot_mqtt_subscribe(m, MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY, on_message, &replies), 0);
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);

    int id = iot_ota_get_firmware_info(ota, pk, dn, found);
    CHECK(id > 0);
    printf("get %d %s\n", id, found);
    fflush(stdout);
    wait_calls(m, &replies, 1, 30);
    CHECK_EQ(replies.type, MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY);
    CHECK(strstr(replies.topic, "/ota/firmware/get_reply") != NULL);
    CHECK(strstr(replies.payload, found) != NULL);
    CHECK(strstr(replies.payload, "\"url\"") != NULL);
    /* The offered firmware is being fetched, as if a command had come. */
    CHECK_EQ(iot_ota_is_fetching(ota), 1);
    iot_ota_firmware_t fw;
    CHECK_EQ(iot_ota_get_firmware(ota, &fw), 0);
    CHECK(strcmp(fw.version, found) == 0);
    CHECK(strcmp(fw.policy, "") == 0);
    char path[512];
    snprintf(path, sizeof(path), "%s/get.bin", dir);
    CHECK(fetch_all(ota, path, 0) > 0);
    report_success(m, ota, found);

    int id2 = iot_ota_get_firmware_info(ota, pk, dn, missing);
    CHECK(id2 > id);
    printf("get %d %s\n", id2, missing);
    fflush(stdout);
    wait_calls(m, &replies, 2, 30);
    CHECK(strstr(replies.payload, "404") != NULL);
    CHECK(strstr(replies.payload, missing) != NULL);
    flush(m);
    /* Nothing started. */
    CHECK_EQ(iot_ota_is_fetching(ota), 0);
    CHECK_EQ(iot_ota_get_firmware(ota, &fw), 0);
    CHECK(strcmp(fw.version, found) == 0);
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    printf("get ok\n");
    return 0;
}

/* ---- slow: a download longer than the keep-alive, with no yield ---- */

static int scenario_slow(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    iot_mqtt_t *m = connect_mqtt(host, port, "c-slow"); /* keep-alive 5 s */
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    wait_fetching(m, ota, 30);
    double t0 = now_s();
    long long got = fetch_all(ota, NULL, 0);
    double took = now_s() - t0;
    printf("fetched %lld bytes in %.1f s\n", got, took);
    /* Only iot_ota_fetch_yield ran all that time: it kept the connection up. */
    CHECK(took > 8.0);
    CHECK_EQ(iot_mqtt_is_connected(m), 1);
    report_success(m, ota, "2.0.0");
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    printf("slow ok\n");
    return 0;
}

/* ---- reconnect: the broker restarts while the device waits ---- */

static int scenario_reconnect(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    iot_mqtt_t *m = connect_mqtt(host, port, "c-reconnect");
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    int down = 0;
    double deadline = now_s() + 60;
    while (iot_ota_is_fetching(ota) != 1) {
        CHECK(now_s() < deadline);
        int rc = iot_mqtt_yield(m, 200);
        if (rc == IOT_OTA_ERR_MQTT_FAILED) {
            down++;
            CHECK_EQ(iot_mqtt_is_connected(m), 0);
        } else {
            CHECK_EQ(rc, 0);
        }
    }
    /* The connection was seen down, and came back by itself. */
    printf("yields while down: %d\n", down);
    CHECK(down > 0);
    CHECK_EQ(iot_mqtt_is_connected(m), 1);
    CHECK(fetch_all(ota, NULL, 0) > 0);
    report_success(m, ota, "2.0.0");
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    printf("reconnect ok\n");
    return 0;
}

/* ---- boot: one start of a device with slots, for the reboot tests ----
 * boot HOST PORT PK DN STATE_DIR RUNNING HEALTHY MODE
 * Sets the state directory, makes the start-up decision (prints boot=N),
 * informs RUNNING; with MODE "upgrade" it then waits for a command,
 * fetches it and says it is installed (install_done(1): prints
 * installed=N), and exits as for the reboot. */

static int scenario_boot(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    const char *state = argv[4], *running = argv[5], *mode = argv[7];
    int healthy = atoi(argv[6]);
    iot_mqtt_t *m = connect_mqtt(host, port, dn);
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_boot_confirm(ota, running, healthy), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_install_done(ota, 1), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_set_state_dir(ota, NULL), IOT_OTA_ERR_INVALID_PARAM);
    CHECK_EQ(iot_ota_set_state_dir(ota, state), 0);
    CHECK_EQ(iot_ota_set_state_dir(ota, state), IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_boot_confirm(ota, "", healthy), IOT_OTA_ERR_INVALID_PARAM);
    int boot = iot_ota_boot_confirm(ota, running, healthy);
    printf("boot=%d\n", boot);
    fflush(stdout);
    CHECK(boot >= 0);
    CHECK_EQ(iot_ota_report_firmware_version(ota, running), 0);
    if (strcmp(mode, "upgrade") == 0) {
        CHECK_EQ(iot_ota_install_done(ota, 1), IOT_OTA_ERR_INVALID_STATE);
        wait_fetching(m, ota, 30);
        char path[512];
        snprintf(path, sizeof(path), "%s/image.bin", state);
        CHECK(fetch_all(ota, path, 0) > 0);
        CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADING, 100), 0);
        printf("installed=%d\n", iot_ota_install_done(ota, 1));
    }
    flush(m);
    fflush(stdout);
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    return 0;
}

/* ---- selfreport: the application reports its own percent, as the guide's
 * loop does, after every chunk; one chunk, then a pause with the connection
 * serviced, then a firmware get as a marker on the wire: the SDK's own
 * reports before it may count only the bytes this program has received. ---- */

static int scenario_selfreport(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3];
    static char buf[BUF_SIZE];
    iot_mqtt_t *m = connect_mqtt(host, port, "c-selfreport");
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    wait_fetching(m, ota, 30);
    long long total = iot_ota_file_size(ota);
    CHECK(total > 0);
    int n;
    while ((n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1)) == 0) {
    }
    CHECK(n > 0);
    /* The whole (small) image is read ahead meanwhile. */
    double until = now_s() + 1.5;
    while (now_s() < until) iot_mqtt_yield(m, 100);
    printf("marker at %lld of %lld\n", (long long)iot_ota_fetched_size(ota), total);
    CHECK(iot_ota_get_firmware_info(ota, pk, dn, "9.9.9") > 0);
    flush(m);
    for (;;) {
        long long got = iot_ota_fetched_size(ota);
        CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_DOWNLOADING,
                                         (uint32_t)(got * 100 / total)), 0);
        n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, 1);
        if (n < 0) break;
        /* Slower than the network: the read-ahead stays ahead. */
        struct timespec pause = {0, 2 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    CHECK_EQ(n, IOT_OTA_ERR_INVALID_STATE);
    CHECK_EQ(iot_ota_check_firmware(ota), 0);
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_DOWNLOADING, 100), 0);
    report_success(m, ota, "2.0.0");
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    return 0;
}

/* ---- ackjournal: with a state directory, a command's 200 waits for its
 * journal, which is written by the application's next call on the OTA
 * instance. Three seconds of iot_mqtt_yield alone (the command arrives
 * meanwhile) must send no 200 and write no journal; then a firmware get as
 * a marker on the wire, then iot_ota_is_fetching: journal, then the 200. ---- */

static int scenario_ackjournal(char **argv)
{
    const char *host = argv[0], *port = argv[1], *pk = argv[2], *dn = argv[3], *state = argv[4];
    iot_mqtt_t *m = connect_mqtt(host, port, "c-ackjournal");
    void *ota = iot_ota_init(pk, dn, m);
    CHECK(ota != NULL);
    CHECK_EQ(iot_ota_set_state_dir(ota, state), 0);
    CHECK_EQ(iot_ota_boot_confirm(ota, "1.0.0", 1), IOT_OTA_BOOT_IDLE);
    CHECK_EQ(iot_ota_report_firmware_version(ota, "1.0.0"), 0);
    char journal[512];
    snprintf(journal, sizeof(journal), "%s/journal", state);
    double until = now_s() + 3;
    while (now_s() < until) iot_mqtt_yield(m, 100);
    FILE *j = fopen(journal, "r");
    CHECK(j == NULL); /* nothing journaled without a call on the instance */
    CHECK(iot_ota_get_firmware_info(ota, pk, dn, "9.9.9") > 0);
    flush(m);
    CHECK_EQ(iot_ota_is_fetching(ota), 1);
    j = fopen(journal, "r");
    CHECK(j != NULL);
    fclose(j);
    flush(m);
    CHECK_EQ(iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADE_FAILED, 0), 0);
    flush(m);
    CHECK_EQ(iot_ota_destroy(ota), 0);
    CHECK_EQ(iot_mqtt_destroy(m), 0);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && strcmp(argv[1], "params") == 0) return scenario_params();
    if (argc >= 11 && strcmp(argv[1], "happy") == 0) return scenario_happy(argv + 2);
    if (argc >= 7 && strcmp(argv[1], "fail") == 0) return scenario_fail(argv + 2);
    if (argc >= 7 && strcmp(argv[1], "stall") == 0) return scenario_stall(argv + 2);
    if (argc >= 9 && strcmp(argv[1], "get") == 0) return scenario_get(argv + 2);
    if (argc >= 6 && strcmp(argv[1], "slow") == 0) return scenario_slow(argv + 2);
    if (argc >= 6 && strcmp(argv[1], "reconnect") == 0) return scenario_reconnect(argv + 2);
    if (argc >= 10 && strcmp(argv[1], "boot") == 0) return scenario_boot(argv + 2);
    if (argc >= 6 && strcmp(argv[1], "selfreport") == 0) return scenario_selfreport(argv + 2);
    if (argc >= 7 && strcmp(argv[1], "ackjournal") == 0) return scenario_ackjournal(argv + 2);
    fprintf(stderr, "usage: c_api_test params|happy|fail|stall|get|slow|reconnect|boot|selfreport|ackjournal ARGS...\n");
    return 64;
}
