/*
 * ota_example.c - the vendor guide's OTA flow, in C, over libiot_ota.
 *
 *   ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN
 *               --firmware-version V --output-dir DIR
 *               [--state-dir S] [--trust-key PEM]... [--revoke-key ID]...
 *               [--username U] [--password P]
 *               [--ca-file F] [--to-file] [--once]
 *
 * Creates and connects the MQTT instance, iot_ota_init(), keeps the upgrade
 * journal in S (default DIR) and makes the start-up decision
 * (iot_ota_boot_confirm: a download cut off by a crash resumes), reports
 * version V, then yields until an upgrade arrives. Each upgrade is fetched
 * with iot_ota_fetch_yield() (5000-byte buffer, 1 s timeout) into
 * S/firmware-<version>.bin.part; once the library has verified size and
 * digest the file is synced and renamed to DIR/firmware-<version>.bin (the
 * "install": it needs no reboot, so iot_ota_install_done(ota, 0) commits it
 * and reports SUCCESS), then the new version is informed. A failed download
 * (already reported by the library) removes the part file. With
 * --once the program exits after the first upgrade: 0 on success, 1 on
 * failure (the Rust example's codes); 64 for bad usage. With --to-file the
 * library writes the file itself (iot_ota_fetch_to_file: its own pipeline
 * and buffers, resuming S/firmware-<version>.bin.part after a crash), for a
 * program that only wants the verified file; and, when DIR holds the running
 * version's file, as a delta update from it (iot_ota_set_delta_base: only
 * the chunks it lacks are fetched, when the command names a chunk index).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "iot_config.h"
#include "iot_mqtt.h"
#include "iot_ota.h"

#define BUF_SIZE 5000
/* The part file's stdio buffer: one write(2) per 32 KiB rather than one per
 * chunk. (Given NULL, glibc's setvbuf ignores the size and keeps a 4 KiB
 * buffer: 65,536 writes for 256 MiB, and the download a tenth slower.) */
#define FILE_BUF_SIZE (32 * 1024)
#define FETCH_TIMEOUT_S 1

struct args {
    const char *broker;
    const char *product_key;
    const char *device_name;
    const char *firmware_version;
    const char *output_dir;
    const char *state_dir;
    const char *trust_keys[8];
    int n_trust_keys;
    const char *revoked_keys[8];
    int n_revoked_keys;
    const char *username;
    const char *password;
    const char *ca_file;
    int once;
    int to_file;
};

static void usage(void)
{
    fprintf(stderr,
            "usage: ota_example --broker mqtt://HOST:PORT --product-key PK --device-name DN "
            "--firmware-version V --output-dir DIR [--state-dir S] [--trust-key PEM]... "
            "[--revoke-key ID]... "
            "[--username U] [--password P] "
            "[--ca-file F] [--to-file] [--once]\n");
}

static int parse_args(int argc, char **argv, struct args *a)
{
    memset(a, 0, sizeof(*a));
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char **slot = NULL;
        if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) return -1;
        if (strcmp(flag, "--once") == 0) {
            a->once = 1;
            continue;
        }
        if (strcmp(flag, "--to-file") == 0) {
            a->to_file = 1;
            continue;
        }
        if (strcmp(flag, "--broker") == 0) slot = &a->broker;
        else if (strcmp(flag, "--product-key") == 0) slot = &a->product_key;
        else if (strcmp(flag, "--device-name") == 0) slot = &a->device_name;
        else if (strcmp(flag, "--firmware-version") == 0) slot = &a->firmware_version;
        else if (strcmp(flag, "--output-dir") == 0) slot = &a->output_dir;
        else if (strcmp(flag, "--state-dir") == 0) slot = &a->state_dir;
        else if (strcmp(flag, "--trust-key") == 0) {
            if (a->n_trust_keys == 8) {
                fprintf(stderr, "ota_example: at most 8 --trust-key\n");
                return -1;
            }
            slot = &a->trust_keys[a->n_trust_keys++];
        } else if (strcmp(flag, "--revoke-key") == 0) {
            if (a->n_revoked_keys == 8) {
                fprintf(stderr, "ota_example: at most 8 --revoke-key\n");
                return -1;
            }
            slot = &a->revoked_keys[a->n_revoked_keys++];
        }
        else if (strcmp(flag, "--username") == 0) slot = &a->username;
        else if (strcmp(flag, "--password") == 0) slot = &a->password;
        else if (strcmp(flag, "--ca-file") == 0) slot = &a->ca_file;
        else {
            fprintf(stderr, "ota_example: unknown flag %s\n", flag);
            return -1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "ota_example: %s needs a value\n", flag);
            return -1;
        }
        *slot = argv[++i];
    }
    if (!a->broker || !a->product_key || !a->device_name || !a->firmware_version ||
        !a->output_dir) {
        fprintf(stderr, "ota_example: --broker, --product-key, --device-name, "
                        "--firmware-version and --output-dir are required\n");
        return -1;
    }
    if (!a->state_dir) a->state_dir = a->output_dir;
    return 0;
}

/* Splits mqtt://HOST:PORT (or mqtts://, tcp://, ssl://) into cfg. */
static int parse_broker(const char *url, char *host, size_t host_len, iot_mqtt_config_t *cfg)
{
    const char *rest = strstr(url, "://");
    if (!rest) return -1;
    size_t scheme_len = (size_t)(rest - url);
    if ((scheme_len == 5 && strncmp(url, "mqtts", 5) == 0) ||
        (scheme_len == 3 && strncmp(url, "ssl", 3) == 0)) {
        cfg->use_tls = 1;
    } else if (!((scheme_len == 4 && strncmp(url, "mqtt", 4) == 0) ||
                 (scheme_len == 3 && strncmp(url, "tcp", 3) == 0))) {
        return -1;
    }
    rest += 3;
    const char *colon = strrchr(rest, ':');
    size_t n = colon ? (size_t)(colon - rest) : strlen(rest);
    if (n == 0 || n >= host_len) return -1;
    memcpy(host, rest, n);
    host[n] = '\0';
    if (colon) {
        char *end = NULL;
        long port = strtol(colon + 1, &end, 10);
        if (!end || (*end != '\0' && *end != '/') || port <= 0 || port > 65535) return -1;
        cfg->port = (uint16_t)port;
    }
    return 0;
}

/* Reports a failure status with its reason, and says it on stderr too. */
static void report_failure(void *ota, iot_ota_status_t status, const char *what,
                           const char *path, int err)
{
    char desc[IOT_OTA_DESC_MAX + 1];
    snprintf(desc, sizeof(desc), "%s %s: %s", what, path, strerror(err));
    fprintf(stderr, "%s\n", desc);
    iot_ota_report_status(ota, status, 0, desc);
}

/* Downloads, verifies, installs (renames into place) and reports one upgrade.
 * Returns 0 on success. `version` receives the new version on success. */
/* --to-file: the library downloads, verifies and writes the file; this
 * program moves it into place. Returns 0 with the image at `path`. */
static int fetch_to_file(void *ota, const char *staged, const char *path)
{
    fprintf(stderr, "downloading to %s\n", staged);
    int rc = iot_ota_fetch_to_file(ota, staged);
    if (rc != 0) {
        /* Reported by the library; it kept or removed the part file. */
        fprintf(stderr, "download failed: %s; reported by the library\n", iot_ota_strerror(rc));
        return -1;
    }
    if (strcmp(staged, path) != 0 && rename(staged, path) != 0) {
        report_failure(ota, IOT_OTA_STATUS_FLASH_FAILED, "cannot move the image to", path, errno);
        unlink(staged);
        return -1;
    }
    return 0;
}

static int upgrade(void *ota, const char *dir, const char *state_dir, int to_file, char *version,
                   size_t version_len)
{
    iot_ota_firmware_t fw;
    int rc = iot_ota_get_firmware(ota, &fw);
    if (rc != 0) {
        fprintf(stderr, "no upgrade details: %s\n", iot_ota_strerror(rc));
        return -1;
    }
    fprintf(stderr, "upgrade to %s: %llu bytes, %s %s, policy %s\n", fw.version,
            (unsigned long long)fw.size, fw.sign_method, fw.url,
            fw.policy[0] ? fw.policy : "(asked)");

    size_t path_len = strlen(dir) + strlen(state_dir) + strlen(fw.version) + 32;
    char *path = malloc(path_len);
    char *part = malloc(path_len);
    char *buf = malloc(BUF_SIZE);
    char *file_buf = malloc(FILE_BUF_SIZE);
    FILE *out = NULL;
    int ok = 0;
    if (!path || !part || !buf || !file_buf) {
        fprintf(stderr, "out of memory\n");
        iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADE_FAILED, 0);
        goto done;
    }
    snprintf(path, path_len, "%s/firmware-%s.bin", dir, fw.version);
    snprintf(part, path_len, "%s/firmware-%s.bin.part", state_dir, fw.version);
    if (to_file) {
        /* A delta update when the running version's file is here: only the
         * chunks it lacks are fetched (when the command names an index). */
        size_t base_len = strlen(dir) + strlen(version) + 32;
        char *base = malloc(base_len);
        if (base) {
            snprintf(base, base_len, "%s/firmware-%s.bin", dir, version);
            iot_ota_set_delta_base(ota, access(base, R_OK) == 0 ? base : NULL);
            free(base);
        }
        /* part is the library's staged file here (it adds its own .part). */
        snprintf(part, path_len, "%s/firmware-%s.bin", state_dir, fw.version);
        if (fetch_to_file(ota, part, path) != 0) {
            part[0] = '\0'; /* the library's to keep or remove */
            goto done;
        }
        goto install;
    }
    /* After a crash, keep what an earlier run wrote: the library says how
     * much of the part file is this same firmware's, hashes it again, and
     * fetches only the rest. */
    int64_t keep = iot_ota_fetch_resume(ota, part);
    if (keep < 0) keep = 0;
    out = fopen(part, keep > 0 ? "r+b" : "wb");
    if (!out || (keep > 0 && (ftruncate(fileno(out), (off_t)keep) != 0 ||
                              fseeko(out, (off_t)keep, SEEK_SET) != 0))) {
        report_failure(ota, IOT_OTA_STATUS_FLASH_FAILED, "cannot create", part, errno);
        goto done;
    }
    if (keep > 0) fprintf(stderr, "resuming %s from byte %lld\n", part, (long long)keep);
    setvbuf(out, file_buf, _IOFBF, FILE_BUF_SIZE);

    fprintf(stderr, "downloading %s\n", fw.version);
    int last_pct = -1;
    for (;;) {
        int n = iot_ota_fetch_yield(ota, buf, BUF_SIZE, FETCH_TIMEOUT_S);
        if (n > 0) {
            if (fwrite(buf, 1, (size_t)n, out) != (size_t)n) {
                report_failure(ota, IOT_OTA_STATUS_FLASH_FAILED, "writing", part, errno);
                goto done;
            }
            int64_t total = iot_ota_file_size(ota);
            if (total > 0) {
                int pct = (int)(iot_ota_fetched_size(ota) * 100 / total);
                if (pct != last_pct) {
                    /* As the vendor guide's loop does: the application
                     * reports its own percent too (the library's reports
                     * count the same bytes, so the two agree). */
                    iot_ota_report_progress(ota, IOT_OTA_STATUS_DOWNLOADING, (uint32_t)pct);
                    if (pct / 10 != last_pct / 10) fprintf(stderr, "downloaded %d%%\n", pct);
                    last_pct = pct;
                }
            }
        } else if (n == 0) {
            fprintf(stderr, "no data for %d s, still fetching\n", FETCH_TIMEOUT_S);
        } else {
            if (n != IOT_OTA_ERR_INVALID_STATE) {
                fprintf(stderr, "download failed: %s\n", iot_ota_strerror(n));
            }
            break;
        }
    }

    /* The guide's checks: the fetch is finished, and the digest matches. */
    rc = iot_ota_check_firmware(ota);
    if (!iot_ota_fetch_finish(ota) || rc != 0) {
        fprintf(stderr, "upgrade to %s failed (%s); reported by the library\n", fw.version,
                iot_ota_strerror(rc));
        goto done;
    }
    char digest[IOT_OTA_SIGN_MAX + 1];
    if (iot_ota_get_digest(ota, digest, sizeof(digest)) < 0) digest[0] = '\0';
    fprintf(stderr, "downloaded and verified %lld bytes, digest %s\n",
            (long long)iot_ota_fetched_size(ota), digest);

    /* Install: make the image durable, then move it into place. */
    if (fflush(out) != 0 || fsync(fileno(out)) != 0) {
        report_failure(ota, IOT_OTA_STATUS_FLASH_FAILED, "syncing", part, errno);
        goto done;
    }
    fclose(out);
    out = NULL;
    if (rename(part, path) != 0) {
        report_failure(ota, IOT_OTA_STATUS_FLASH_FAILED, "cannot move the image to", path, errno);
        goto done;
    }
install:
    fprintf(stderr, "installing %s\n", path);
    iot_ota_report_progress(ota, IOT_OTA_STATUS_UPGRADING, 100);
    /* Written in place, it runs at once: no reboot, so this commits the
     * upgrade and reports SUCCESS 100. */
    rc = iot_ota_install_done(ota, 0);
    if (rc != IOT_OTA_BOOT_COMMITTED) {
        fprintf(stderr, "committing %s failed: %s\n", fw.version,
                rc < 0 ? iot_ota_strerror(rc) : "rolled back");
        goto done;
    }
    rc = iot_ota_report_firmware_version(ota, fw.version);
    if (rc != 0) {
        fprintf(stderr, "reporting the version failed: %s\n", iot_ota_strerror(rc));
        goto done;
    }
    snprintf(version, version_len, "%s", fw.version);
    fprintf(stderr, "upgraded to %s; reported SUCCESS and version %s\n", fw.version, fw.version);
    ok = 1;

done:
    if (out) fclose(out);
    if (!ok && part && part[0]) unlink(part);
    free(path);
    free(part);
    free(buf);
    free(file_buf); /* after fclose: the stream used it */
    return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
    struct args a;
    if (parse_args(argc, argv, &a) != 0) {
        usage();
        return 64;
    }
    if (mkdir(a.output_dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ota_example: cannot create %s: %s\n", a.output_dir, strerror(errno));
        return 1;
    }
    if (mkdir(a.state_dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ota_example: cannot create %s: %s\n", a.state_dir, strerror(errno));
        return 1;
    }

    char host[256];
    char client_id[256];
    iot_mqtt_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    if (parse_broker(a.broker, host, sizeof(host), &cfg) != 0) {
        fprintf(stderr, "ota_example: bad broker URL %s\n", a.broker);
        usage();
        return 64;
    }
    snprintf(client_id, sizeof(client_id), "%s.%s", a.product_key, a.device_name);
    cfg.host = host;
    cfg.client_id = client_id;
    cfg.username = a.username;
    cfg.password = a.password;
    /* --ca-file: trusted for HTTPS downloads always, and for the broker when
     * its URL is mqtts:// (only then is MQTT over TLS). */
    cfg.download_ca_file = a.ca_file;
    if (cfg.use_tls) cfg.ca_file = a.ca_file;

    int exit_code = 1;
    void *ota = NULL;
    iot_mqtt_t *mqtt = iot_mqtt_create(&cfg);
    if (!mqtt) {
        fprintf(stderr, "ota_example: invalid MQTT configuration\n");
        return 1;
    }
    /* A device program starts at boot, often before the network or the
     * broker: wait for it. Each failed attempt returns after the library's
     * own backoff (jittered, 0.5 s doubling to 30 s), so this loop does not
     * spin. */
    int rc;
    for (int attempt = 1; (rc = iot_mqtt_connect(mqtt, 10000)) != 0; attempt++) {
        if (rc != IOT_OTA_ERR_MQTT_FAILED && rc != IOT_OTA_ERR_TIMEOUT) {
            fprintf(stderr, "ota_example: cannot connect to %s: %s\n", a.broker,
                    iot_ota_strerror(rc));
            goto out;
        }
        fprintf(stderr, "waiting for the broker %s (attempt %d: %s); retrying\n", a.broker,
                attempt, iot_ota_strerror(rc));
    }
    ota = iot_ota_init(a.product_key, a.device_name, mqtt);
    if (!ota) {
        fprintf(stderr, "ota_example: iot_ota_init failed\n");
        goto out;
    }
    char version[IOT_OTA_VERSION_MAX + 1];
    snprintf(version, sizeof(version), "%s", a.firmware_version);
    /* Before the first inform: what the journal's upgrade needs. This
     * program installs in place (no reboot, no slots), so the answers that
     * matter are "resumed" (a crash cut a download: it goes on) and "idle". */
    /* --trust-key: only firmware whose manifest a pinned key signed. */
    for (int i = 0; i < a.n_trust_keys; i++) {
        rc = iot_ota_trust_key(ota, a.trust_keys[i]);
        if (rc != 0) {
            fprintf(stderr, "ota_example: --trust-key %s: %s\n", a.trust_keys[i],
                    iot_ota_strerror(rc));
            goto out;
        }
    }
    for (int i = 0; i < a.n_revoked_keys; i++) {
        rc = iot_ota_revoke_key(ota, a.revoked_keys[i]);
        if (rc != 0) {
            fprintf(stderr, "ota_example: --revoke-key %s: %s\n", a.revoked_keys[i],
                    iot_ota_strerror(rc));
            goto out;
        }
    }
    rc = iot_ota_set_state_dir(ota, a.state_dir);
    if (rc == 0) rc = iot_ota_boot_confirm(ota, version, 1);
    if (rc < 0) {
        fprintf(stderr, "ota_example: upgrade journal in %s: %s\n", a.state_dir,
                iot_ota_strerror(rc));
        goto out;
    }
    if (rc == IOT_OTA_BOOT_RESUMED) fprintf(stderr, "going on with the upgrade a crash cut off\n");
    if (rc == IOT_OTA_BOOT_COMMITTED) fprintf(stderr, "upgrade to %s committed\n", version);
    if (rc == IOT_OTA_BOOT_ROLLED_BACK) fprintf(stderr, "upgrade rolled back\n");
    rc = iot_ota_report_firmware_version(ota, version);
    if (rc != 0) {
        fprintf(stderr, "ota_example: cannot report version %s: %s\n", version,
                iot_ota_strerror(rc));
        goto out;
    }
    fprintf(stderr, "connected to %s; reported version %s\n", a.broker, version);

    for (;;) {
        fprintf(stderr, "waiting for upgrade commands\n");
        while (iot_ota_is_fetching(ota) != 1) {
            rc = iot_mqtt_yield(mqtt, 1000);
            if (rc == IOT_OTA_ERR_MQTT_FAILED) {
                fprintf(stderr, "MQTT connection lost; reconnecting\n");
            } else if (rc != 0) {
                fprintf(stderr, "ota_example: yield: %s\n", iot_ota_strerror(rc));
                goto out;
            }
        }
        int ok = upgrade(ota, a.output_dir, a.state_dir, a.to_file, version, sizeof(version)) == 0;
        if (a.once) {
            exit_code = ok ? 0 : 1;
            break;
        }
    }

out:
    if (ota) iot_ota_destroy(ota);
    iot_mqtt_destroy(mqtt); /* sends what is still queued, then disconnects */
    return exit_code;
}
