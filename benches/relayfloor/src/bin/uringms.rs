// io_uring byte relay, multishot recv with a ring of provided buffers (one armed recv per
// socket for the connection's life), DEFER_TASKRUN + SINGLE_ISSUER, optional registered files.
// Per direction: buffers received queue in order; one send in flight; buffer returned to the
// ring when its send completed.  --mode ms | ms-fixed
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use relayfloor::*;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

const NB: u16 = 4096; // buffers (power of two)
const BSZ: usize = 4096;
const ACCEPT: u64 = u64::MAX;
const BGID: u16 = 7;

struct Dir {
    q: VecDeque<(u16, usize, usize)>,
    sending: bool,
    armed: bool,
}
struct Pair {
    fd: [i32; 2],
    d: [Dir; 2],
    closing: bool,
    live: bool,
}

struct BufRing {
    base: *mut types::BufRingEntry,
    tail: u16,
    mem: Vec<u8>,
}
impl BufRing {
    fn give(&mut self, bid: u16) {
        unsafe {
            let e = &mut *self.base.add((self.tail & (NB - 1)) as usize);
            e.set_addr(self.mem.as_ptr().add(bid as usize * BSZ) as u64);
            e.set_len(BSZ as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
        }
    }
    fn publish(&self) {
        unsafe {
            let t = types::BufRingEntry::tail(self.base) as *const AtomicU16;
            (*t).store(self.tail, Ordering::Release);
        }
    }
    fn ptr(&self, bid: u16, off: usize) -> *const u8 {
        unsafe { self.mem.as_ptr().add(bid as usize * BSZ + off) }
    }
}

fn main() {
    let a = args();
    let fixed = a.mode == "ms-fixed";
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(a.entries)
        .expect("setup");
    const NFIX: u32 = 4096;
    if fixed {
        ring.submitter().register_files_sparse(NFIX).unwrap();
    }
    let rsz = NB as usize * std::mem::size_of::<types::BufRingEntry>();
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            rsz,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as *mut types::BufRingEntry;
    assert!(base as isize != -1);
    let mut br = BufRing {
        base,
        tail: 0,
        mem: vec![0u8; NB as usize * BSZ],
    };
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(base as u64, NB, BGID, 0)
            .expect("buf ring")
    };
    for b in 0..NB {
        br.give(b);
    }
    br.publish();

    let l = listener(a.listen);
    let lfd = l.as_raw_fd();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut pending: Vec<squeue::Entry> = Vec::with_capacity(1024);
    pending.push(accept_entry(lfd, ACCEPT));
    let mut enobufs = 0u64;

    let recv = |p: &Pair, idx: usize, s: usize| -> squeue::Entry {
        let ud = ((idx as u64) << 3) | ((s as u64) << 1);
        if fixed {
            opcode::RecvMulti::new(types::Fixed((idx * 2 + s) as u32), BGID)
                .build()
                .user_data(ud)
        } else {
            opcode::RecvMulti::new(types::Fd(p.fd[s]), BGID)
                .build()
                .user_data(ud)
        }
    };
    let send = |p: &Pair, br: &BufRing, idx: usize, s: usize| -> squeue::Entry {
        let (bid, off, len) = p.d[s].q[0];
        let ud = ((idx as u64) << 3) | ((s as u64) << 1) | 1;
        let (ptr, n) = (br.ptr(bid, off), (len - off) as u32);
        if fixed {
            opcode::Send::new(types::Fixed((idx * 2 + 1 - s) as u32), ptr, n)
        } else {
            opcode::Send::new(types::Fd(p.fd[1 - s]), ptr, n)
        }
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud)
    };

    loop {
        submit_and_wait(&mut ring, &mut pending);
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        let mut to_free = Vec::new();
        let mut gave = false;
        for (ud, res, flags) in cqes {
            if ud == ACCEPT {
                pending.push(accept_entry(lfd, ACCEPT));
                if res < 0 {
                    continue;
                }
                let c = res;
                let Some(ufd) = upstream_for(c, a.upstream, false) else {
                    continue;
                };
                let nd = || Dir {
                    q: VecDeque::with_capacity(16),
                    sending: false,
                    armed: true,
                };
                let p = Pair {
                    fd: [c, ufd],
                    d: [nd(), nd()],
                    closing: false,
                    live: true,
                };
                let idx = place(&mut pairs, &mut free, p);
                if fixed {
                    ring.submitter()
                        .register_files_update((idx * 2) as u32, &[c, ufd])
                        .unwrap();
                }
                pending.push(recv(&pairs[idx], idx, 0));
                pending.push(recv(&pairs[idx], idx, 1));
                continue;
            }
            let idx = (ud >> 3) as usize;
            let s = ((ud >> 1) & 1) as usize;
            let p = &mut pairs[idx];
            let mut fail = false;
            if ud & 1 == 0 {
                // recv
                if res > 0 {
                    let bid = cqueue::buffer_select(flags).expect("bid");
                    if p.closing {
                        br.give(bid);
                        gave = true;
                    } else {
                        p.d[s].q.push_back((bid, 0, res as usize));
                        if !p.d[s].sending {
                            p.d[s].sending = true;
                            pending.push(send(p, &br, idx, s));
                        }
                    }
                }
                if !cqueue::more(flags) {
                    p.d[s].armed = false;
                    if res == -libc::ENOBUFS && !p.closing {
                        enobufs += 1;
                        p.d[s].armed = true;
                        pending.push(recv(p, idx, s));
                    } else if res > 0 && !p.closing {
                        p.d[s].armed = true;
                        pending.push(recv(p, idx, s));
                    } else {
                        fail = true;
                    }
                }
            } else {
                // send
                p.d[s].sending = false;
                if res <= 0 || p.closing {
                    fail = true;
                } else {
                    let e = &mut p.d[s].q[0];
                    e.1 += res as usize;
                    if e.1 >= e.2 {
                        let bid = e.0;
                        p.d[s].q.pop_front();
                        br.give(bid);
                        gave = true;
                    }
                    if !p.d[s].q.is_empty() {
                        p.d[s].sending = true;
                        pending.push(send(p, &br, idx, s));
                    }
                }
            }
            if fail {
                if !p.closing {
                    p.closing = true;
                    unsafe {
                        libc::shutdown(p.fd[0], libc::SHUT_RDWR);
                        libc::shutdown(p.fd[1], libc::SHUT_RDWR);
                    }
                }
                if p.live && !p.d[0].armed && !p.d[1].armed && !p.d[0].sending && !p.d[1].sending {
                    p.live = false;
                    for s in 0..2 {
                        while let Some((bid, _, _)) = p.d[s].q.pop_front() {
                            br.give(bid);
                            gave = true;
                        }
                    }
                    close_pair(p.fd);
                    to_free.push(idx);
                }
            }
        }
        if gave {
            br.publish();
        }
        free.extend(to_free);
        if enobufs == u64::MAX {
            eprintln!("{enobufs}");
        }
    }
}
