/*
 * netio.c's entry point: the module init (blockd_native.c) adds the net* functions to the
 * addon's exports. The only link between the two files, in this direction only.
 */
#ifndef BLOCKD_NETIO_H
#define BLOCKD_NETIO_H

#include <node_api.h>

void netio_register(napi_env env, napi_value exports);

#endif
