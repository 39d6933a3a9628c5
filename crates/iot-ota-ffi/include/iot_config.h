/*
 * iot_config.h - feature switches of the IoT device SDK (libiot_ota).
 *
 * As the vendor guide says, the OTA function is turned on by DEVICE_OTA in
 * this file: iot_ota.h declares the OTA API only when DEVICE_OTA is defined.
 * It is defined by default; to build a program without the OTA API, delete
 * the definition below, or compile with -DIOT_CONFIG_NO_DEVICE_OTA.
 * (The library itself always contains the OTA functions.)
 */
#ifndef IOT_CONFIG_H
#define IOT_CONFIG_H

#if !defined(DEVICE_OTA) && !defined(IOT_CONFIG_NO_DEVICE_OTA)
#define DEVICE_OTA 1
#endif

#endif /* IOT_CONFIG_H */
