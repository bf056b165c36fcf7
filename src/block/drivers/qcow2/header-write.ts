/**
 * Header edits on a qcow2 image whose driver is closed (graph.reopenDriver), as QEMU's
 * qcow2_update_header does them: cluster 0 is rebuilt (header, extensions, backing file name)
 * and written whole.
 */
import { BlockError } from '../../../util/errors.js';
import type { BlockIO } from '../../types.js';
import { HEADER_PROBE, MAX_BACKING_FILE_NAME, buildHeader, corrupt, parseHeader } from './format.js';

/** Read and parse cluster 0. */
async function readHeader(file: BlockIO): Promise<{ h: ReturnType<typeof parseHeader>; cs: number }> {
  const size = file.size();
  const probe = Buffer.alloc(Math.min(HEADER_PROBE, size));
  await file.read(probe, 0);
  if (probe.length < 24) throw corrupt('Image is not in qcow2 format');
  const bits = probe.readUInt32BE(20);
  const c0 = Buffer.alloc(Math.min(2 ** Math.min(Math.max(bits, 9), 21), size));
  await file.read(c0, 0);
  const h = parseHeader(c0, size);
  return { h, cs: 2 ** h.clusterBits };
}

/**
 * change-backing-file: record `backingFile` (and `backingFormat`) in the header; QEMU's
 * qcow2_change_backing_file refuses names over 1023 bytes with EINVAL.
 */
export async function setBackingFile(file: BlockIO, backingFile: string, backingFormat: string): Promise<void> {
  if (Buffer.byteLength(backingFile) > MAX_BACKING_FILE_NAME) {
    throw new BlockError('BAD_OPTION', 'EINVAL', 'Invalid argument');
  }
  const { h, cs } = await readHeader(file);
  h.backingFile = backingFile === '' ? undefined : backingFile;
  h.backingFormat = backingFile === '' ? undefined : backingFormat;
  const built = buildHeader(h);
  const out = Buffer.alloc(Math.min(cs, file.size()));
  if (built.length > out.length) throw new BlockError('BAD_OPTION', 'ENOSPC', 'No space left on device');
  built.copy(out);
  await file.write(out, 0);
  await file.flush();
}
