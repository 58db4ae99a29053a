// Lean edge-triggered epoll byte relay: one read per readable edge (short read = drained),
// write to the peer, keep the rest on partial write and wait for EPOLLOUT.
use relayfloor::*;
use std::os::fd::AsRawFd;

const BUF: usize = 16384;

struct Dir {
    buf: Box<[u8; BUF]>,
    off: usize,
    len: usize,     // pending bytes buf[off..len] to write to the other side
    readable: bool, // source side may have more data (edge seen, not yet drained)
}
struct Pair {
    fd: [i32; 2],
    d: [Dir; 2], // d[s]: bytes read from side s, written to side 1-s
    live: bool,
}

fn newdir() -> Dir {
    Dir {
        buf: Box::new([0u8; BUF]),
        off: 0,
        len: 0,
        readable: false,
    }
}

// returns false if the pair must close
fn pump(p: &mut Pair, s: usize) -> bool {
    let src = p.fd[s];
    let dst = p.fd[1 - s];
    let d = &mut p.d[s];
    loop {
        if d.off < d.len {
            let n = unsafe {
                libc::send(
                    dst,
                    d.buf.as_ptr().add(d.off) as *const _,
                    d.len - d.off,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error().unwrap();
                if e == libc::EAGAIN || e == libc::ENOTCONN {
                    return true;
                }
                return false;
            }
            d.off += n as usize;
            if d.off < d.len {
                return true;
            } // partial: wait for EPOLLOUT
            d.off = 0;
            d.len = 0;
        }
        if !d.readable {
            return true;
        }
        let n = unsafe { libc::recv(src, d.buf.as_mut_ptr() as *mut _, BUF, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap();
            if e == libc::EAGAIN {
                d.readable = false;
                return true;
            }
            return false;
        }
        if n == 0 {
            return false;
        }
        let n = n as usize;
        if n < BUF {
            d.readable = false;
        }
        d.len = n;
    }
}

fn main() {
    let a = args();
    let l = listener(a.listen);
    l.set_nonblocking(true).unwrap();
    let lfd = l.as_raw_fd();
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: u64::MAX,
    };
    unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev) };
    let mut pairs: Vec<Pair> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, -1) };
        if n < 0 {
            continue;
        }
        let mut closed: Vec<usize> = Vec::new();
        for ev in &evs[..n as usize] {
            let (events, tok) = (ev.events, ev.u64);
            if tok == u64::MAX {
                loop {
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if c < 0 {
                        break;
                    }
                    let Some(ufd) = upstream_for(c, a.upstream, true) else {
                        continue;
                    };
                    let p = Pair {
                        fd: [c, ufd],
                        d: [newdir(), newdir()],
                        live: true,
                    };
                    let idx = place(&mut pairs, &mut free, p);
                    for s in 0..2 {
                        let mut ev = libc::epoll_event {
                            events: (libc::EPOLLIN
                                | libc::EPOLLOUT
                                | libc::EPOLLRDHUP
                                | libc::EPOLLET) as u32,
                            u64: (idx * 2 + s) as u64,
                        };
                        unsafe {
                            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, pairs[idx].fd[s], &mut ev)
                        };
                    }
                }
                continue;
            }
            let idx = (tok / 2) as usize;
            let s = (tok % 2) as usize;
            let p = &mut pairs[idx];
            if !p.live {
                continue;
            }
            let mut ok = true;
            if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                != 0
            {
                p.d[s].readable = true;
                ok &= pump(p, s);
            }
            if ok && events & libc::EPOLLOUT as u32 != 0 && p.d[1 - s].off < p.d[1 - s].len {
                ok &= pump(p, 1 - s);
            }
            if !ok {
                p.live = false;
                close_pair(p.fd);
                closed.push(idx);
            }
        }
        free.extend(closed);
    }
}
