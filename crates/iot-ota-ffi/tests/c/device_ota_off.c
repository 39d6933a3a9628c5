/*
 * With DEVICE_OTA off (-DIOT_CONFIG_NO_DEVICE_OTA), iot_ota.h declares no OTA
 * function: this file, which gives those names other meanings, compiles only
 * then. Compiled without the define it must fail, which proves the gate.
 * The error codes and the MQTT API stay available either way.
 */
#include "iot_ota.h"

static int iot_ota_init = IOT_OTA_ERR_NONE;
static int iot_ota_fetch_yield = MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE;
static int iot_ota_status_t = 0;

int device_ota_off(void);
int device_ota_off(void)
{
#ifdef DEVICE_OTA
#error "DEVICE_OTA is defined"
#endif
    return iot_ota_init + iot_ota_fetch_yield + iot_ota_status_t + (iot_ota_strerror(0) != 0);
}
