/*
 * iot_mqtt.h - the MQTT instance of libiot_ota: the `mqtt_client` that
 * iot_ota_init() takes.
 *
 * Threading: an instance, and the OTA instances made on it, are used from
 * one thread at a time. The library starts no thread for the protocol:
 * the connection makes progress only inside iot_mqtt_connect(),
 * iot_mqtt_yield(), iot_ota_fetch_yield() and iot_mqtt_destroy(). Call
 * iot_mqtt_yield() regularly (at least once per keep-alive interval) when not
 * downloading. Callbacks run inside those calls, on the caller's thread,
 * after the library has released its locks: they may call any function of
 * this API, except destroying the instance whose yield is running them.
 *
 * Ownership: iot_mqtt_create() returns an instance the caller owns and frees
 * with iot_mqtt_destroy(). Every string passed in is copied; the caller
 * keeps ownership of it. Pointers handed to a callback are valid only during
 * the call. A NULL, destroyed or foreign handle is detected and rejected
 * with IOT_OTA_ERR_INVALID_PARAM, never dereferenced.
 *
 * Return values are 0 or a negative iot_ota_err_t (declared in iot_ota.h).
 */
#ifndef IOT_MQTT_H
#define IOT_MQTT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An MQTT instance (opaque). */
typedef struct iot_mqtt iot_mqtt_t;

/* How iot_mqtt_create() connects. Zero-initialise it, then set at least
 * host and client_id. The connection uses a clean session. */
typedef struct iot_mqtt_config {
    const char *host;      /* broker host name or address (required) */
    uint16_t port;         /* 0: 1883, or 8883 with TLS */
    const char *client_id; /* MQTT client id (required) */
    const char *username;  /* NULL: none */
    const char *password;  /* NULL: empty (with a username) */
    const char *ca_file;   /* PEM file of extra trusted CAs, or NULL; setting
                              it turns MQTT TLS on. Unless download_ca_file
                              is set, the same roots (plus the system's)
                              serve HTTPS firmware downloads. */
    int use_tls;           /* non-zero: MQTT over TLS even without ca_file
                              (system roots) */
    uint16_t keep_alive_s; /* keep-alive in seconds; 0: 60; minimum 5 */
    const char *download_ca_file; /* PEM file of extra trusted CAs for HTTPS
                              firmware downloads only (added to the
                              system's), or NULL. It does not turn MQTT TLS
                              on: a plain-MQTT device can pin the private CA
                              of its firmware server. Added after 0.1.0: a
                              program zero-initialising the struct as told
                              keeps the old behaviour; recompile against
                              this header. */
} iot_mqtt_config_t;

/* Message types a callback can be subscribed to. */
typedef enum {
    /* Upgrade commands: /sys/{productKey}/{identifier}/ota/firmware/upgrade */
    MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE = 1,
    /* Firmware get replies: /sys/{productKey}/{identifier}/ota/firmware/get_reply */
    MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY = 2
} iot_mqtt_sub_type_t;

/* Receives one message of a subscribed type: its topic and its JSON payload
 * (NUL-terminated; payload_len excludes the NUL). Both are valid only during
 * the call. user_data is the pointer given to iot_mqtt_subscribe(). */
typedef void (*iot_mqtt_callback_t)(void *user_data, iot_mqtt_sub_type_t type,
                                    const char *topic, const char *payload,
                                    uint32_t payload_len);

/* A new, unconnected instance; NULL when config is NULL or invalid (NULL or
 * empty host or client_id, a string that is not UTF-8, an unusable CA file). */
iot_mqtt_t *iot_mqtt_create(const iot_mqtt_config_t *config);

/* Connects and waits for the broker's acknowledgement, at most timeout_ms
 * (0: 10 s). Returns 0; IOT_OTA_ERR_MQTT_FAILED when the attempt failed;
 * IOT_OTA_ERR_TIMEOUT when no answer came in time (later yields keep trying,
 * with backoff); IOT_OTA_ERR_INVALID_PARAM for a bad handle;
 * IOT_OTA_ERR_INVALID_STATE after destroy. */
int iot_mqtt_connect(iot_mqtt_t *mqtt, uint32_t timeout_ms);

/* Drives the connection (receive, acknowledge, keep alive, send what is
 * queued, reconnect after a loss) for up to timeout_ms, calling the callbacks
 * of what arrived. Returns early once a callback ran or an OTA instance got
 * an upgrade command or a firmware reply. Returns 0 when connected at the
 * end, IOT_OTA_ERR_MQTT_FAILED when the connection is down,
 * IOT_OTA_ERR_INVALID_STATE before iot_mqtt_connect(),
 * IOT_OTA_ERR_INVALID_PARAM for a bad handle. */
int iot_mqtt_yield(iot_mqtt_t *mqtt, uint32_t timeout_ms);

/* Routes the messages of `type` to `callback` (NULL removes it). The broker
 * subscriptions to a device's OTA topics are made by iot_ota_init() (and
 * again after every reconnect); this chooses who else sees their messages.
 * Commands and replies are handled by the OTA instance whether or not a
 * callback is set. Returns 0, or IOT_OTA_ERR_INVALID_PARAM for a bad handle
 * or type. */
int iot_mqtt_subscribe(iot_mqtt_t *mqtt, iot_mqtt_sub_type_t type,
                       iot_mqtt_callback_t callback, void *user_data);

/* 1 when connected, 0 when not, IOT_OTA_ERR_INVALID_PARAM for a bad handle. */
int iot_mqtt_is_connected(iot_mqtt_t *mqtt);

/* Sends what is queued (reports included), disconnects and frees the
 * instance. Destroy its OTA instances first; any left fail their calls with
 * IOT_OTA_ERR_MQTT_FAILED until destroyed. Returns 0, or (harmlessly)
 * IOT_OTA_ERR_INVALID_PARAM for NULL or a stale handle. */
int iot_mqtt_destroy(iot_mqtt_t *mqtt);

#ifdef __cplusplus
}
#endif

#endif /* IOT_MQTT_H */
