/* Prints the C view of the ABI: struct layouts and enum values, one
 * "name value" line each, for tests/c_api.rs to compare with the Rust side. */
#include <stddef.h>
#include <stdio.h>

#include "iot_ota.h"

#define VALUE(x) printf("%s %lld\n", #x, (long long)(x))
#define FIELD(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(t, f))

int main(void)
{
    printf("sizeof(iot_mqtt_config_t) %zu\n", sizeof(iot_mqtt_config_t));
    printf("sizeof(iot_ota_firmware_t) %zu\n", sizeof(iot_ota_firmware_t));
    FIELD(iot_mqtt_config_t, host);
    FIELD(iot_mqtt_config_t, port);
    FIELD(iot_mqtt_config_t, client_id);
    FIELD(iot_mqtt_config_t, username);
    FIELD(iot_mqtt_config_t, password);
    FIELD(iot_mqtt_config_t, ca_file);
    FIELD(iot_mqtt_config_t, use_tls);
    FIELD(iot_mqtt_config_t, keep_alive_s);
    FIELD(iot_mqtt_config_t, download_ca_file);
    FIELD(iot_ota_firmware_t, version);
    FIELD(iot_ota_firmware_t, url);
    FIELD(iot_ota_firmware_t, sign);
    FIELD(iot_ota_firmware_t, sign_method);
    FIELD(iot_ota_firmware_t, policy);
    FIELD(iot_ota_firmware_t, size);
    printf("sizeof(iot_ota_status_t) %zu\n", sizeof(iot_ota_status_t));
    printf("sizeof(iot_mqtt_sub_type_t) %zu\n", sizeof(iot_mqtt_sub_type_t));
    VALUE(IOT_OTA_ERR_NONE);
    VALUE(IOT_OTA_ERR_GENERAL);
    VALUE(IOT_OTA_ERR_INVALID_PARAM);
    VALUE(IOT_OTA_ERR_INVALID_STATE);
    VALUE(IOT_OTA_ERR_STR_TOO_LONG);
    VALUE(IOT_OTA_ERR_FETCH_FAILED);
    VALUE(IOT_OTA_ERR_NOMEM);
    VALUE(IOT_OTA_ERR_MQTT_FAILED);
    VALUE(IOT_OTA_ERR_TIMEOUT);
    VALUE(IOT_OTA_ERR_VERIFY_FAILED);
    VALUE(IOT_OTA_STATUS_DOWNLOADING);
    VALUE(IOT_OTA_STATUS_DOWNLOADED);
    VALUE(IOT_OTA_STATUS_UPGRADING);
    VALUE(IOT_OTA_STATUS_SUCCESS);
    VALUE(IOT_OTA_STATUS_UPGRADE_FAILED);
    VALUE(IOT_OTA_STATUS_DOWNLOAD_FAILED);
    VALUE(IOT_OTA_STATUS_VERIFY_FAILED);
    VALUE(IOT_OTA_STATUS_FLASH_FAILED);
    VALUE(IOT_OTA_FETCH_STATE_UNINIT);
    VALUE(IOT_OTA_FETCH_STATE_INIT);
    VALUE(IOT_OTA_FETCH_STATE_FETCHING);
    VALUE(IOT_OTA_FETCH_STATE_FETCHED);
    VALUE(IOT_OTA_BOOT_IDLE);
    VALUE(IOT_OTA_BOOT_COMMITTED);
    VALUE(IOT_OTA_BOOT_ROLLED_BACK);
    VALUE(IOT_OTA_BOOT_REBOOT);
    VALUE(IOT_OTA_BOOT_ROLL_BACK);
    VALUE(IOT_OTA_BOOT_RESUMED);
    VALUE(MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE);
    VALUE(MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY);
    VALUE(IOT_OTA_VERSION_MAX);
    VALUE(IOT_OTA_URL_MAX);
    VALUE(IOT_OTA_SIGN_MAX);
    VALUE(IOT_OTA_DESC_MAX);
    return 0;
}
