/*
 * The vendor guide's eight OTA functions, declared with exactly the guide's
 * prototypes, after the header. C accepts a repeated declaration only when it
 * is compatible, so any difference between the header and the guide fails
 * this compile (gcc -Wall -Werror).
 */
#include "iot_config.h"
#include "iot_ota.h"

void *iot_ota_init(const char *product_key, const char *device_name, void * mqtt_client);
int iot_ota_destroy(void *handle);
int iot_ota_report_progress(void *handle, iot_ota_status_t status, uint32_t progress);
int iot_ota_report_firmware_version(void *handle, const char *version);
int iot_ota_is_fetching(void *handle);
int iot_ota_fetch_finish(void *handle);
int iot_ota_fetch_yield(void *handle, char *buf, uint32_t buf_len, uint32_t timeout_s);
int iot_ota_get_firmware_info(void *handle, const char *product_key, const char *identifier, const char * version);

/* And the guide's names are usable as it uses them. */
int guide_flow(void *mqtt_client);
int guide_flow(void *mqtt_client)
{
    char buf[5000];
    void *h = iot_ota_init("pk", "dn", mqtt_client);
    int rc = iot_ota_report_firmware_version(h, "1.0.0");
    while (iot_ota_is_fetching(h) && !iot_ota_fetch_finish(h)) {
        if (iot_ota_fetch_yield(h, buf, sizeof(buf), 1) < 0) break;
    }
    rc |= iot_ota_report_progress(h, IOT_OTA_STATUS_SUCCESS, 100);
    rc |= iot_ota_get_firmware_info(h, "pk", "dn", "2.0.0");
    return rc | iot_ota_destroy(h);
}
