/* SPDX-License-Identifier: Apache-2.0 */
/* Built for the target by `make size`: the symbol's size is sizeof the client
 * struct there (the library's own RAM; the tables are the caller's). */
#include "perch_device.h"

const unsigned char perch_state_probe[sizeof(perch_client_t)] = {0};
/* Per-entry sizes of the caller's tables, for the README's RAM figures. */
const unsigned char perch_name_probe[sizeof(perch_name_t)] = {0};
const unsigned char perch_outgoing_probe[sizeof(perch_outgoing_t)] = {0};
const unsigned char perch_config_probe[sizeof(perch_config_t)] = {0};
